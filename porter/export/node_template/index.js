'use strict';
// Written by `porter export --node`: this model on onnxruntime-node, images decoded, resized and normalized as
// porter does, so the tensor is porter predict's, bit for bit: PNGs by pngjs; JPEGs by libjpeg-turbo's decoder
// (mozjpeg built to WebAssembly, @jsquash/jpeg: the IDCT, fancy chroma upsampling, colour conversion and EXIF
// orientation of Pillow's libjpeg-turbo); resizing is Pillow's bilinear filter. CMYK JPEGs, which that decoder
// refuses, go through jpeg-js (close, not exact).
const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');
const { PNG } = require('pngjs');

const spec = require('./preprocess.json');
const info = require('./model.json');
const labels = fs.existsSync(path.join(__dirname, 'labels.json')) ? require('./labels.json') : null;

// Pillow refuses images over twice its MAX_IMAGE_PIXELS as decompression bombs; so does this package, before
// decoding (a JPEG or PNG header can claim 65535 x 65535 pixels in a few bytes)
const MAX_PIXELS = 2 * Math.floor(1024 * 1024 * 1024 / 4 / 3);

let jpegDecoder = null;  // the WebAssembly module, compiled once
async function libjpeg() {
  if (!jpegDecoder) {
    jpegDecoder = (async () => {
      const { init, default: decode } = await import('@jsquash/jpeg/decode.js');
      const wasm = fs.readFileSync(require.resolve('@jsquash/jpeg/codec/dec/mozjpeg_dec.wasm'));
      await init(await WebAssembly.compile(wasm));
      return decode;
    })();
  }
  return jpegDecoder;
}

// (width, height, components) from a JPEG's frame header, or null when there is none. Bytes between segments
// are skipped as libjpeg skips them ("extraneous bytes before marker"), so a header can't hide from this check.
function jpegFrame(data) {
  let i = 2;
  while (i + 9 < data.length) {
    if (data[i] !== 0xff) { i += 1; continue; }
    const marker = data[i + 1];
    if (marker === 0xff || marker === 0x00 || (marker >= 0xd0 && marker <= 0xd8) || marker === 0x01) { i += 1; continue; }
    if (marker === 0xd9 || marker === 0xda) return null;  // end of image, or the scan began before any frame header
    const length = data.readUInt16BE(i + 2);
    if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
      return { height: data.readUInt16BE(i + 5), width: data.readUInt16BE(i + 7), components: data[i + 9] };
    }
    i += 2 + length;
  }
  return null;
}

function checkSize(width, height, label) {
  if (width * height > MAX_PIXELS) {
    throw new Error(`${label}: refused, image too large (${width} x ${height} pixels, over ${MAX_PIXELS})`);
  }
}

// images: a path or a Buffer of a PNG or JPEG file -> { width, height, rgba }
async function decode(file) {
  const label = Buffer.isBuffer(file) ? 'image' : file;
  const data = Buffer.isBuffer(file) ? file : fs.readFileSync(file);
  if (data[0] === 0x89 && data[1] === 0x50) {
    if (data.length >= 24) checkSize(data.readUInt32BE(16), data.readUInt32BE(20), label);
    const png = PNG.sync.read(data);
    return { width: png.width, height: png.height, rgba: png.data };
  }
  if (data[0] === 0xff && data[1] === 0xd8) {
    const frame = jpegFrame(data);
    if (!frame) throw new Error(`${label}: can't decode JPEG (no frame header before the image data)`);
    checkSize(frame.width, frame.height, label);
    try {
      if (frame.components !== 4) {
        const img = await (await libjpeg())(data.buffer.slice(data.byteOffset, data.byteOffset + data.length),
          { preserveOrientation: true });  // jsquash's name for "apply the EXIF orientation", as porter does
        return { width: img.width, height: img.height, rgba: img.data };
      }
      const img = require('jpeg-js').decode(data, { useTArray: true, formatAsRGBA: true, maxMemoryUsageInMB: 1024 });
      return { width: img.width, height: img.height, rgba: img.data };
    } catch (e) {  // libjpeg reports through emscripten ("Program terminated with exit(1)"): name the file
      throw new Error(`${label}: can't decode JPEG (${e && e.message ? e.message : e}); the file may be truncated or corrupt`);
    }
  }
  throw new Error(`${label}: not a PNG or JPEG file`);
}

// Pillow's Resample.c: a separable triangle filter (support widened when shrinking), fixed-point coefficients
// with 22 bits of precision, horizontal pass then vertical, rounded to 8 bits in between.
const PRECISION_BITS = 22;
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = 1.0 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Float64Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let ww = 0.0;
    const ss = 1.0 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    for (let x = 0; x < xmax; x++) {
      let t = (x + xmin - center + 0.5) * ss;
      if (t < 0) t = -t;
      const w = t < 1.0 ? 1.0 - t : 0.0;
      kk[xx * ksize + x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) if (ww !== 0.0) kk[xx * ksize + x] /= ww;
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  const fixed = new Float64Array(kk.length);
  for (let i = 0; i < kk.length; i++) {
    fixed[i] = kk[i] < 0 ? Math.trunc(-0.5 + kk[i] * (1 << PRECISION_BITS)) : Math.trunc(0.5 + kk[i] * (1 << PRECISION_BITS));
  }
  return { ksize, bounds, k: fixed };
}

function clip8(v) {
  if (v >= 2 ** (PRECISION_BITS + 8)) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / 2 ** PRECISION_BITS);
}

function resize(img, outW, outH) {  // RGBA in, RGB out
  const { width: w, height: h, rgba } = img;
  let rgb = new Uint8Array(w * h * 3);
  for (let i = 0; i < w * h; i++) { rgb[i * 3] = rgba[i * 4]; rgb[i * 3 + 1] = rgba[i * 4 + 1]; rgb[i * 3 + 2] = rgba[i * 4 + 2]; }
  if (w === outW && h === outH) return rgb;
  let cw = w;
  if (outW !== w) {
    const { ksize, bounds, k } = coefficients(w, outW);
    const out = new Uint8Array(outW * h * 3);
    for (let y = 0; y < h; y++) for (let xx = 0; xx < outW; xx++) {
      const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1];
      for (let c = 0; c < 3; c++) {
        let ss = 2 ** (PRECISION_BITS - 1);
        for (let x = 0; x < xmax; x++) ss += rgb[(y * w + x + xmin) * 3 + c] * k[xx * ksize + x];
        out[(y * outW + xx) * 3 + c] = clip8(ss);
      }
    }
    rgb = out;
    cw = outW;
  }
  if (outH !== h) {
    const { ksize, bounds, k } = coefficients(h, outH);
    const out = new Uint8Array(cw * outH * 3);
    for (let yy = 0; yy < outH; yy++) {
      const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1];
      for (let x = 0; x < cw; x++) for (let c = 0; c < 3; c++) {
        let ss = 2 ** (PRECISION_BITS - 1);
        for (let y = 0; y < ymax; y++) ss += rgb[((y + ymin) * cw + x) * 3 + c] * k[yy * ksize + y];
        out[(yy * cw + x) * 3 + c] = clip8(ss);
      }
    }
    rgb = out;
  }
  return rgb;
}

// (p * scale - mean) / std as porter computes it: a = scale / std and b = -mean / std in float32, then p * a + b
function affine(channels) {
  const f = Math.fround;
  const stat = (v) => (v.length === 1 ? Array(channels).fill(v[0]) :
    (v.length === 3 && channels === 1 ? [f((f(v[0]) + f(v[1]) + f(v[2])) / 3)] : v));
  const mean = stat(spec.mean).map(f), std = stat(spec.std).map(f);
  return { a: std.map((s) => f(f(spec.scale) / s)), b: mean.map((m, i) => f(-m / std[i])) };
}

function toTensor(images) {
  const [H, W] = spec.size;
  const C = spec.channels || 3;
  const { a, b } = affine(C);
  const f = Math.fround;
  const integer = info.image_dtype !== 'float32';
  const Typed = { uint8: Uint8Array, int32: Int32Array, float32: Float32Array }[info.image_dtype];
  const data = new Typed(images.length * H * W * C);
  const order = spec.channel_order === 'BGR' ? [2, 1, 0] : [0, 1, 2];
  images.forEach((img, n) => {
    const rgb = resize(img, W, H);
    for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
      const p = (y * W + x) * 3;
      for (let c = 0; c < C; c++) {
        let v;
        if (integer) v = C === 1 ? Math.round(0.299 * rgb[p] + 0.587 * rgb[p + 1] + 0.114 * rgb[p + 2]) : rgb[p + order[c]];
        else if (C === 1) v = f(f(f(f(f(rgb[p] * f(0.299)) + f(rgb[p + 1] * f(0.587))) + f(rgb[p + 2] * f(0.114))) * a[0]) + b[0]);
        else v = f(f(rgb[p + order[c]] * a[c]) + b[c]);
        const i = spec.layout === 'NHWC' ? ((n * H + y) * W + x) * C + c : ((n * C + c) * H + y) * W + x;
        data[i] = v;
      }
    }
  });
  const dims = spec.layout === 'NHWC' ? [images.length, H, W, C] : [images.length, C, H, W];
  return new ort.Tensor(info.image_dtype, data, dims);
}

function probabilities(row) {
  if (info.score_transform === 'exp') return row.map(Math.exp);
  if (info.score_transform !== 'softmax') return row;
  const m = Math.max(...row);
  const e = row.map((v) => Math.exp(v - m));
  const s = e.reduce((x, y) => x + y, 0);
  return e.map((v) => v / s);
}

async function load(options = {}) {
  const session = await ort.InferenceSession.create(path.join(__dirname, 'model.onnx'), options);
  return {
    session,
    labels,
    preprocess: spec,
    // images: paths or Buffers of PNG / JPEG files. Classifiers: [{label, index, score, topK: [{label, score}]}];
    // other models: their named outputs (onnxruntime-node Tensors) per batch
    async predict(images, { topK = 5, batchSize = info.fixed_batch || 32 } = {}) {
      const results = [];
      for (let start = 0; start < images.length; start += batchSize) {
        const chunk = await Promise.all(images.slice(start, start + batchSize).map(decode));
        const n = chunk.length;
        while (info.fixed_batch && chunk.length < info.fixed_batch) chunk.push(chunk[0]);  // pad a fixed batch
        const out = await session.run({ [info.image_input]: toTensor(chunk) });
        if (!info.score_output) { results.push(out); continue; }
        const scores = out[info.score_output];
        const k = scores.dims[1];
        for (let i = 0; i < n; i++) {
          const row = probabilities(Array.from(scores.data.slice(i * k, (i + 1) * k), Number));
          const order = row.map((s, j) => [s, j]).sort((p, q) => q[0] - p[0] || p[1] - q[1]).slice(0, topK);
          const name = (j) => (labels ? labels[j] : j);
          results.push({ label: name(order[0][1]), index: order[0][1], score: order[0][0],
            topK: order.map(([s, j]) => ({ label: name(j), score: s })) });
        }
      }
      return results;
    },
  };
}

module.exports = { load, decode, toTensor, resize };
