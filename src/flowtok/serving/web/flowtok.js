// FlowTok in the browser: the graphs of `flowtok export onnx` run by onnxruntime-web (WebAssembly).
// The steps between the graphs follow manifest.json, as flowtok.export.runtime does in Python:
// tokenise, encode, sample the projector's posterior, Euler steps with classifier-free guidance,
// decode; and for captions: encode the image, Euler steps, then the decoder's best caption of the
// grammar the defaults name (grammar.js, the table in manifest.json), or argmax and detokenise.
import * as ort from "./ort/ort.wasm.min.mjs";
import { CaptionGrammar } from "./grammar.js";
import { WordPiece } from "./wordpiece.js";

ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
// Threads need a cross-origin isolated page (flowtok demo --static sends the headers); else one.
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function gaussian(n, seed) {
  const uniform = mulberry32(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u = Math.max(uniform(), 1e-12);
    const v = uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    out[i] = r * Math.cos(2 * Math.PI * v);
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * v);
  }
  return out;
}

export class FlowTokWeb {
  constructor(base, manifest, wordpiece) {
    this.base = base;
    this.manifest = manifest;
    this.wordpiece = wordpiece;
    this.sessions = new Map();
    this.bytes = 0;
    this.grammar = manifest.caption_grammar ? new CaptionGrammar(manifest.caption_grammar) : null;
  }

  static async load(base = "model/") {
    const get = async (file) => {
      const response = await fetch(new URL(file, new URL(base, location.href)));
      if (!response.ok) throw new Error(`cannot fetch ${file}: HTTP ${response.status}`);
      return response;
    };
    const manifest = await (await get("manifest.json")).json();
    if (manifest.format !== "flowtok-onnx") throw new Error("model/manifest.json is not a flowtok ONNX export");
    const tokenizerText = await (await get(manifest.text.tokenizer)).text();
    const web = new FlowTokWeb(base, manifest, new WordPiece(JSON.parse(tokenizerText)));
    web.bytes += tokenizerText.length;
    web.get = get;
    return web;
  }

  async session(name) {
    if (!this.sessions.has(name)) {
      const entry = this.manifest.graphs[name];
      if (!entry) throw new Error(`this export has no ${name} graph`);
      const file = Object.values(entry.files)[0];
      const promise = (async () => {
        const bytes = new Uint8Array(await (await this.get(file)).arrayBuffer());
        this.bytes += bytes.length;
        return ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
      })();
      this.sessions.set(name, promise);
    }
    return this.sessions.get(name);
  }

  async run(name, feeds) {
    const session = await this.session(name);
    return session.run(feeds);
  }

  static cleanPrompt(prompt) {
    const text = Array.from(prompt, (ch) => (/\p{C}/u.test(ch) ? " " : ch)).join("").split(/\s+/u).filter(Boolean).join(" ");
    if (!text) throw new Error("Please enter a prompt.");
    if (prompt.length > 4096) throw new Error(`The prompt has ${prompt.length} characters; the limit is 4096.`);
    return text;
  }

  tokenize(prompts) {
    const t = this.manifest.text;
    const L = t.max_length;
    const ids = new BigInt64Array(prompts.length * L).fill(BigInt(t.pad_token_id));
    const mask = new BigInt64Array(prompts.length * L);
    prompts.forEach((prompt, b) => {
      const content = this.wordpiece.encode(prompt).slice(0, L - 2);
      const row = [t.bos_token_id, ...content, t.eos_token_id];
      row.forEach((id, i) => { ids[b * L + i] = BigInt(id); mask[b * L + i] = 1n; });
    });
    return { ids, mask };
  }

  decodeIds(row) {
    const t = this.manifest.text;
    let ids = Array.from(row);
    if (ids.length && ids[0] === t.bos_token_id) ids = ids.slice(1);
    const stop = ids.findIndex((id) => id === t.eos_token_id || id === t.pad_token_id || id === t.bos_token_id);
    if (stop >= 0) ids = ids.slice(0, stop);
    let text = this.wordpiece.decode(ids);
    for (const [a, b] of t.decode_replacements) text = text.split(a).join(b);
    text = text.split(/\s+/u).filter(Boolean).join(" ");
    return text.replace(new RegExp(t.decode_join_digits, "gu"), "").trim();
  }

  // x [B, K, C] from t = 0 to t = 1 through flow `name`; guidance s != 1 runs [x; x] in one call.
  async solve(name, x, batch, steps, guidance) {
    const [K, C] = [x.length / batch / this.latentChannels(name), this.latentChannels(name)];
    const n = batch * K * C;
    const guided = guidance !== 1;
    const rows = guided ? 2 * batch : batch;
    const nulls = new BigInt64Array(rows);
    if (guided) nulls.fill(1n, batch);
    let cur = Float32Array.from(x);
    for (let i = 0; i < steps; i++) {
      const t0 = Math.fround(i / steps);
      const dt = Math.fround(Math.fround((i + 1) / steps) - t0);
      const input = new Float32Array(rows * K * C);
      input.set(cur);
      if (guided) input.set(cur, n);
      const out = await this.run(name, {
        x: new ort.Tensor("float32", input, [rows, K, C]),
        t: new ort.Tensor("float32", new Float32Array(rows).fill(t0), [rows]),
        null_indicator: new ort.Tensor("int64", nulls, [rows]),
      });
      const v = out.velocity.data;
      const next = new Float32Array(n);
      for (let j = 0; j < n; j++) {
        const vel = guided ? v[n + j] + guidance * (v[j] - v[n + j]) : v[j];
        next[j] = cur[j] + dt * vel;
      }
      cur = next;
    }
    return cur;
  }

  latentChannels(name) {
    return name === "t2i_flow" ? this.manifest.image_latent.channels : this.manifest.text_latent.channels;
  }

  // One image for `prompt`: an ImageData of size x size. seed === null uses the posterior mean.
  async textToImage(prompt, { steps, guidance, seed = 0 } = {}) {
    const m = this.manifest;
    steps = steps ?? m.defaults.num_inference_steps;
    guidance = guidance ?? m.defaults.guidance_scale;
    const text = FlowTokWeb.cleanPrompt(prompt);
    const { ids, mask } = this.tokenize([text]);
    const L = m.text.max_length;
    const states = (await this.run("text_encoder", {
      input_ids: new ort.Tensor("int64", ids, [1, L]),
      attention_mask: new ort.Tensor("int64", mask, [1, L]),
    })).states;
    const moments = await this.run("text_projector", { states });
    const mean = moments.latent_mean.data;
    const logvar = moments.latent_logvar.data;
    let z = Float32Array.from(mean);
    if (seed !== null) {
      const eps = gaussian(z.length, seed);
      for (let i = 0; i < z.length; i++) z[i] = mean[i] + Math.exp(0.5 * logvar[i]) * eps[i];
    }
    const latents = await this.solve("t2i_flow", z, 1, steps, guidance);
    const scale = m.image_latent.scale_factor;
    const K = m.image_latent.tokens;
    const C = m.image_latent.channels;
    const feeds = { latents: new ort.Tensor("float32", latents.map((v) => v / scale), [1, K, C]) };
    if (m.image_latent.decoder_reads_text) feeds.text_states = states;
    const pixels = (await this.run("image_decoder", feeds)).images.data;
    const size = m.image.size;
    const rgba = new Uint8ClampedArray(size * size * 4);
    for (let p = 0; p < size * size; p++) {
      for (let c = 0; c < 3; c++) rgba[p * 4 + c] = Math.round(Math.min(1, Math.max(0, pixels[c * size * size + p])) * 255);
      rgba[p * 4 + 3] = 255;
    }
    return new ImageData(rgba, size, size);
  }

  // The model's input from any drawable: shorter side to `size`, centre crop, transparency over white.
  prepareImage(source, width, height) {
    const size = this.manifest.image.size;
    const scale = size / Math.min(width, height);
    const w = Math.max(size, Math.round(width * scale));
    const h = Math.max(size, Math.round(height * scale));
    const canvas = new OffscreenCanvas(size, size);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, size, size);
    ctx.imageSmoothingEnabled = w !== width || h !== height;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(source, -Math.floor((w - size) / 2), -Math.floor((h - size) / 2), w, h);
    return ctx.getImageData(0, 0, size, size);
  }

  async imageToText(imageData, { steps, guidance } = {}) {
    const m = this.manifest;
    steps = steps ?? m.defaults.num_inference_steps;
    guidance = guidance ?? m.defaults.caption_guidance_scale;
    const size = m.image.size;
    const chw = new Float32Array(3 * size * size);
    for (let p = 0; p < size * size; p++) {
      for (let c = 0; c < 3; c++) chw[c * size * size + p] = imageData.data[p * 4 + c] / 255;
    }
    const latents = (await this.run("image_encoder", {
      images: new ort.Tensor("float32", chw, [1, 3, size, size]),
    })).latents.data.map((v) => v * m.image_latent.scale_factor);
    const z = await this.solve("i2t_flow", latents, 1, steps, guidance);
    const L = m.text_latent.tokens;
    const C = m.text_latent.channels;
    const logits = (await this.run("text_decoder", {
      text_latents: new ort.Tensor("float32", z, [1, L, C]),
    })).logits;
    const [, positions, V] = logits.dims;
    const grammar = m.defaults.caption_grammar;
    if (grammar) {
      if (!this.grammar || this.grammar.name !== grammar) {
        throw new Error(`the model's defaults ask for the ${grammar} caption grammar but manifest.json has no table for it`);
      }
      return this.grammar.decode(logits.data, 1, positions, V)[0];
    }
    const ids = [];
    for (let i = 0; i < positions; i++) {
      let best = 0;
      for (let v = 1; v < V; v++) if (logits.data[i * V + v] > logits.data[i * V + best]) best = v;
      ids.push(best);
    }
    return this.decodeIds(ids);
  }
}
