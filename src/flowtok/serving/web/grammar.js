// Captions constrained to a grammar: the table `flowtok export onnx` writes into manifest.json
// ("caption_grammar"), decoded as flowtok.caption_grammar does in Python (the PyTorch pipeline and the
// torch-free runtime): for every skeleton, the sum over positions of the fixed token's score or the best
// score of the slot's word class, in float64, position after position; the largest sum wins (first on
// ties), each slot takes its class's best word (first on ties). Equal logits give equal captions.

export class CaptionGrammar {
  constructor(table) {
    if (!table || table.format !== "flowtok-caption-grammar" || table.version !== 1) {
      throw new Error("manifest.json: caption_grammar is not a version 1 flowtok caption grammar");
    }
    this.name = table.name;
    this.length = table.length;
    this.words = table.words;
    this.texts = table.skeletons.map((s) => s.text);
    // Full rows: token id >= 0, or -1 - c for a slot of word class c; trailing pads restored.
    this.rows = table.skeletons.map((s) => {
      const row = new Array(table.length).fill(table.pad_token_id);
      s.ids.forEach((id, i) => { row[i] = id; });
      return row;
    });
    const ids = new Set(table.word_ids.flat());
    for (const row of this.rows) for (const id of row) if (id >= 0) ids.add(id);
    this.vocab = Int32Array.from([...ids].sort((a, b) => a - b));
    const local = new Map(Array.from(this.vocab, (id, i) => [id, i]));
    this.fixed = this.rows.map((row) => row.map((id) => (id >= 0 ? local.get(id) : -1)));
    this.classLocal = table.word_ids.map((list) => list.map((id) => local.get(id)));
  }

  // Captions from decoder logits: a flat Float32Array [B, L, V].
  decode(logits, batch, length, vocabSize) {
    const U = this.vocab.length;
    const scores = new Float64Array(batch * length * U);
    for (let b = 0; b < batch; b++) {
      for (let p = 0; p < length; p++) {
        const row = (b * length + p) * vocabSize;
        for (let u = 0; u < U; u++) scores[(b * length + p) * U + u] = logits[row + this.vocab[u]];
      }
    }
    return this.decodeScores(scores, batch, length);
  }

  // Captions from the scores at `vocab`'s ids only: a flat array [B, L, U], L <= the grammar's length.
  decodeScores(scores, batch, length) {
    if (length > this.length) throw new Error(`the grammar's rows have ${this.length} positions, got ${length}`);
    const U = this.vocab.length;
    const C = this.classLocal.length;
    const out = [];
    for (let b = 0; b < batch; b++) {
      const at = (p, u) => scores[(b * length + p) * U + u];
      const bestScore = new Float64Array(C * length);
      const bestWord = new Int32Array(C * length);
      for (let c = 0; c < C; c++) {
        for (let p = 0; p < length; p++) {
          let best = 0;
          for (let w = 1; w < this.classLocal[c].length; w++) {
            if (at(p, this.classLocal[c][w]) > at(p, this.classLocal[c][best])) best = w;
          }
          bestWord[c * length + p] = best;
          bestScore[c * length + p] = at(p, this.classLocal[c][best]);
        }
      }
      let bestK = 0;
      let bestTotal = -Infinity;
      this.rows.forEach((row, k) => {
        let total = 0;
        for (let p = 0; p < length; p++) total += row[p] >= 0 ? at(p, this.fixed[k][p]) : bestScore[(-1 - row[p]) * length + p];
        if (total > bestTotal) { bestTotal = total; bestK = k; }
      });
      // Slots past the scored positions (a decoder shorter than the captions) take their class's first word.
      const chosen = [];
      this.rows[bestK].forEach((id, p) => {
        if (id < 0) chosen.push(this.words[-1 - id][p < length ? bestWord[(-1 - id) * length + p] : 0]);
      });
      const pieces = this.texts[bestK].split("{}");
      out.push(pieces.map((piece, i) => (i === 0 ? piece : chosen[i - 1] + piece)).join(""));
    }
    return out;
  }
}
