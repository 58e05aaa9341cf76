// BERT WordPiece (the MiniLM text encoder's tokenizer) from a `tokenizers` tokenizer.json, in the
// browser: BertNormalizer (clean text, CJK spacing, lowercase, strip accents), BertPreTokenizer,
// greedy longest-match WordPiece, and the WordPiece decoder. flowtok's tests check its ids and
// decoded text against the Python `tokenizers` library on the same strings.

const isControl = (ch) => {
  if (ch === "\t" || ch === "\n" || ch === "\r") return false;
  return /\p{C}/u.test(ch);
};
const isWhitespace = (ch) => ch === " " || ch === "\t" || ch === "\n" || ch === "\r" || /\p{Zs}/u.test(ch);
const isPunctuation = (ch) => {
  const c = ch.codePointAt(0);
  if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126)) return true;
  return /\p{P}/u.test(ch);
};
const isChinese = (c) =>
  (c >= 0x4e00 && c <= 0x9fff) || (c >= 0x3400 && c <= 0x4dbf) || (c >= 0x20000 && c <= 0x2a6df) ||
  (c >= 0x2a700 && c <= 0x2b73f) || (c >= 0x2b740 && c <= 0x2b81f) || (c >= 0x2b820 && c <= 0x2ceaf) ||
  (c >= 0xf900 && c <= 0xfaff) || (c >= 0x2f800 && c <= 0x2fa1f);

export class WordPiece {
  constructor(json) {
    const model = json.model;
    this.vocab = new Map(Object.entries(model.vocab));
    this.idToToken = [];
    for (const [token, id] of this.vocab) this.idToToken[id] = token;
    this.unk = model.unk_token;
    this.prefix = model.continuing_subword_prefix;
    this.maxChars = model.max_input_chars_per_word;
    const norm = json.normalizer || {};
    this.lowercase = norm.lowercase !== false;
    this.stripAccents = norm.strip_accents === null || norm.strip_accents === undefined ? this.lowercase : norm.strip_accents;
    this.cleanText = norm.clean_text !== false;
    this.chineseChars = norm.handle_chinese_chars !== false;
    this.added = (json.added_tokens || []).map((t) => ({ content: t.content, id: t.id, special: t.special }));
    this.specialIds = new Set(this.added.filter((t) => t.special).map((t) => t.id));
    this.decoderCleanup = !json.decoder || json.decoder.cleanup !== false;
  }

  normalize(text) {
    let out = "";
    for (const ch of text) {
      const c = ch.codePointAt(0);
      if (this.cleanText) {
        if (c === 0 || c === 0xfffd || isControl(ch)) continue;
        if (isWhitespace(ch)) { out += " "; continue; }
      }
      out += this.chineseChars && isChinese(c) ? ` ${ch} ` : ch;
    }
    if (this.stripAccents) out = out.normalize("NFD").replace(/\p{Mn}/gu, "");
    if (this.lowercase) out = out.toLowerCase();
    return out;
  }

  preTokenize(text) {
    const words = [];
    let word = "";
    for (const ch of text) {
      if (isWhitespace(ch)) {
        if (word) words.push(word);
        word = "";
      } else if (isPunctuation(ch)) {
        if (word) words.push(word);
        words.push(ch);
        word = "";
      } else {
        word += ch;
      }
    }
    if (word) words.push(word);
    return words;
  }

  wordIds(word) {
    const chars = Array.from(word);
    if (chars.length > this.maxChars) return [this.vocab.get(this.unk)];
    const ids = [];
    let start = 0;
    while (start < chars.length) {
      let end = chars.length;
      let found = null;
      while (start < end) {
        const piece = (start > 0 ? this.prefix : "") + chars.slice(start, end).join("");
        if (this.vocab.has(piece)) { found = this.vocab.get(piece); break; }
        end -= 1;
      }
      if (found === null) return [this.vocab.get(this.unk)];
      ids.push(found);
      start = end;
    }
    return ids;
  }

  // Content ids without special tokens added around them; special-token strings typed in the
  // text are matched as such first, as the tokenizers library does.
  encode(text) {
    let parts = [{ text, id: null }];
    for (const token of this.added) {
      const next = [];
      for (const part of parts) {
        if (part.id !== null) { next.push(part); continue; }
        const pieces = part.text.split(token.content);
        pieces.forEach((piece, i) => {
          if (i > 0) next.push({ text: "", id: token.id });
          if (piece) next.push({ text: piece, id: null });
        });
      }
      parts = next;
    }
    const ids = [];
    for (const part of parts) {
      if (part.id !== null) { ids.push(part.id); continue; }
      for (const word of this.preTokenize(this.normalize(part.text))) ids.push(...this.wordIds(word));
    }
    return ids;
  }

  decode(ids) {
    let text = "";
    let first = true;
    for (const id of ids) {
      if (this.specialIds.has(id)) continue;
      const token = this.idToToken[id];
      if (token === undefined) continue;
      // As the tokenizers library: the first token is kept whole, "##" and all.
      if (first) text += token;
      else if (token.startsWith(this.prefix)) text += token.slice(this.prefix.length);
      else text += " " + token;
      first = false;
    }
    if (this.decoderCleanup) {
      const rules = [[" .", "."], [" ?", "?"], [" !", "!"], [" ,", ","], [" ' ", "'"], [" n't", "n't"],
                     [" 'm", "'m"], [" do not", " don't"], [" 's", "'s"], [" 've", "'ve"], [" 're", "'re"]];
      for (const [a, b] of rules) text = text.split(a).join(b);
    }
    return text;
  }
}
