"""COCO caption metrics through pycocoevalcap, exactly as ``COCOEvalCap.evaluate`` computes them.

Both sides go through the PTB tokenizer (a JVM), then BLEU-1..4, METEOR, ROUGE-L and CIDEr score
them. CIDEr's document frequencies come from the references given, so it is only comparable
between runs on the same reference set. SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap
downloads on first use; where those jars are absent (offline machines) SPICE is reported as
unavailable instead of attempting the download.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from ..errors import FlowTokError, InvalidInputError

SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def _require_backend() -> None:
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise FlowTokError("caption metrics need pycocoevalcap: pip install 'flowtok[eval]'")
    if shutil.which("java") is None:
        raise FlowTokError("caption metrics need Java on PATH (pycocoevalcap's tokenizer and METEOR are Java)")


def java_version() -> str:
    java = shutil.which("java")
    if java is None:
        return "not found"
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0] if lines else "unknown"


def protocol() -> dict:
    """Implementation details written into results JSON."""
    try:
        version = importlib.metadata.version("pycocoevalcap")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    return {
        "implementation": f"pycocoevalcap {version}",
        "tokenizer": "pycocoevalcap PTBTokenizer (stanford-corenlp 3.4.1), punctuation removed",
        "metrics": "Bleu(4) (closest ref length), Meteor 1.5 (-l en -norm), Rouge (ROUGE-L), Cider (CIDEr-D, n=4, sigma=6)",
        "java": java_version(),
    }


def spice_missing_reason() -> str | None:
    """Why SPICE cannot run here, or None when its CoreNLP jars are present."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return "pycocoevalcap not installed"
    lib = Path(next(iter(spec.submodule_search_locations))) / "spice" / "lib"
    missing = [j for j in SPICE_JARS if not (lib / j).is_file()]
    if missing:
        return f"needs {', '.join(missing)} in {lib} (downloaded by pycocoevalcap; not present)"
    return None


def _close_meteor(meteor: object) -> None:
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    try:
        proc.stdin.close()
        proc.wait(timeout=30)
    except (OSError, subprocess.SubprocessError):
        proc.kill()


# METEOR's JVM spends ~14 s loading its paraphrase tables before it scores the first caption, and each score
# request is independent of the ones before. So one JVM serves every call of this process (both splits of an
# evaluation, repeated evaluations in a notebook) and is ended at exit, or restarted if it has died.
_meteor_lock = threading.Lock()
_meteor: Any = None


def _shared_meteor() -> Any:
    global _meteor
    with _meteor_lock:
        if _meteor is None or _meteor.meteor_p.poll() is not None:
            from pycocoevalcap.meteor.meteor import Meteor

            _meteor = Meteor()
            atexit.register(_close_meteor, _meteor)
        return _meteor


def _drop_meteor(meteor: Any) -> None:
    global _meteor
    with _meteor_lock:
        if _meteor is meteor:
            _meteor = None
    _close_meteor(meteor)


def caption_metrics(predictions: list[str], references: list[list[str]], spice: bool = True) -> dict:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE where possible).

    ``predictions[i]`` is scored against the list ``references[i]``. Returns a dict with the keys
    :data:`METRIC_KEYS`, ``spice`` (float or None) and ``spice_status``.
    """
    if len(predictions) != len(references):
        raise InvalidInputError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise InvalidInputError("caption metrics need at least one prediction")
    if any(not refs for refs in references):
        raise InvalidInputError("every prediction needs at least one reference caption")
    _require_backend()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTB tokenises one caption per line: a newline inside a caption would shift every later one.
    gts = {i: [{"caption": " ".join(r.split())} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": " ".join(p.split())}] for i, p in enumerate(predictions)}
    tokenizer = PTBTokenizer()
    gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    # An empty caption yields no output line; give it an empty token list so it scores 0.
    for i in range(len(predictions)):
        res_tok.setdefault(i, [""])

    out: dict = {}
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    out.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    meteor = _shared_meteor()
    try:
        out["meteor"] = float(meteor.compute_score(gts_tok, res_tok)[0])
    except BaseException:  # a JVM that failed mid-request cannot be trusted with the next one
        _drop_meteor(meteor)
        raise
    out["rouge_l"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    out["cider"] = float(Cider().compute_score(gts_tok, res_tok)[0])

    out["spice"], out["spice_status"] = None, "not requested"
    if spice:
        reason = spice_missing_reason()
        if reason is not None:
            out["spice_status"] = f"unavailable: {reason}"
        else:
            try:
                from pycocoevalcap.spice.spice import Spice

                out["spice"] = float(Spice().compute_score(gts_tok, res_tok)[0])
                out["spice_status"] = "ok"
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                out["spice_status"] = f"unavailable: {type(exc).__name__}: {exc}"
    return out
