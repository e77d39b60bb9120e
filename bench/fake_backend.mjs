// A fast fake OpenAI Chat Completions backend for the benchmark; never meant to be the bottleneck.
//
//   node bench/fake_backend.mjs --port 18000 [--host 127.0.0.1]
//
// POST /v1/chat/completions (any path ending in /chat/completions):
//   stream false -> a small chat.completion JSON with usage (Content-Length, keep-alive)
//   stream true  -> OpenAI chunks: a role chunk, N content chunks of a few characters, a finish
//                   chunk, a usage chunk with "choices": [] and then "data: [DONE]".
//
// The stream shape is chosen per request, so the gateway (which forwards only the body) can
// drive it:  max_tokens = delay_ms * 10000 + N   (N = max_tokens % 10000 content chunks,
// delay_ms = floor(max_tokens / 10000) between chunks). E.g. 200 -> 200 chunks back to back,
// 200050 -> 50 chunks 20 ms apart. Headers x-bench-chunks / x-bench-delay-ms or query
// parameters ?chunks=&delay_ms= override it for direct use.
//
// GET /healthz -> {"status":"ok"}; GET /stats -> request counters.
// Prints "listening <port>" on stdout once it accepts connections.

import http from 'node:http';

const args = process.argv.slice(2);
function arg(name, dflt) {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
}
const PORT = Number(arg('port', '18000'));
const HOST = arg('host', '127.0.0.1');
if (HOST !== '127.0.0.1' && HOST !== 'localhost' && HOST !== '::1') {
  console.error('fake backend: loopback only');
  process.exit(2);
}

const stats = { requests: 0, streams: 0, streams_done: 0, streams_aborted: 0, chunks: 0 };
const CREATED = Math.floor(Date.now() / 1000);
const cache = new Map(); // model -> precomputed strings

function strings(model) {
  let s = cache.get(model);
  if (s) return s;
  const m = JSON.stringify(model);
  const head = `{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":${CREATED},"model":${m},"choices":[`;
  const contentChunk = (text) =>
    `data: ${head}{"index":0,"delta":{"content":${JSON.stringify(text)}},"finish_reason":null}]}\n\n`;
  const words = [];
  for (let i = 0; i < 16; i++) words.push(contentChunk(`tk${i.toString(16)} `)); // a few characters
  s = {
    role: `data: ${head}{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n`,
    words,
    finish: `data: ${head}{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n`,
    usage: (n) =>
      `data: ${head.slice(0, -1)}[],"usage":{"prompt_tokens":8,"completion_tokens":${n},"total_tokens":${8 + n}}}\n\n` +
      'data: [DONE]\n\n',
    completion: Buffer.from(JSON.stringify({
      id: 'chatcmpl-bench',
      object: 'chat.completion',
      created: CREATED,
      model,
      choices: [{
        index: 0,
        message: { role: 'assistant', content: 'Hello from the bench backend.' },
        finish_reason: 'stop',
      }],
      usage: { prompt_tokens: 8, completion_tokens: 7, total_tokens: 15 },
    })),
  };
  if (cache.size > 64) cache.clear();
  cache.set(model, s);
  return s;
}

function shape(req, url, body) {
  const mt = Number(body.max_tokens ?? body.max_completion_tokens ?? 16) || 16;
  let chunks = mt % 10000;
  let delay = Math.floor(mt / 10000);
  const q = url.indexOf('?');
  if (q >= 0) {
    const p = new URLSearchParams(url.slice(q + 1));
    if (p.has('chunks')) chunks = Number(p.get('chunks'));
    if (p.has('delay_ms')) delay = Number(p.get('delay_ms'));
  }
  if (req.headers['x-bench-chunks']) chunks = Number(req.headers['x-bench-chunks']);
  if (req.headers['x-bench-delay-ms']) delay = Number(req.headers['x-bench-delay-ms']);
  return { chunks: Math.max(0, chunks | 0), delay: Math.max(0, delay) };
}

function stream(req, res, body, url) {
  const { chunks, delay } = shape(req, url, body);
  const s = strings(String(body.model ?? 'bench'));
  stats.streams++;
  res.writeHead(200, {
    'Content-Type': 'text/event-stream',
    'Cache-Control': 'no-cache',
  });
  const wantUsage = !!(body.stream_options && body.stream_options.include_usage);
  const tail = () => s.finish + (wantUsage ? s.usage(chunks) : 'data: [DONE]\n\n');
  if (delay <= 0) {
    // Back to back: one write (one chunked-encoding frame) for the whole answer.
    const parts = [s.role];
    for (let i = 0; i < chunks; i++) parts.push(s.words[i & 15]);
    parts.push(tail());
    stats.chunks += chunks;
    res.end(parts.join(''));
    stats.streams_done++;
    return;
  }
  // Role chunk and first content chunk at once, then one content chunk every `delay` ms.
  let i = 0;
  let timer = null;
  let closed = false;
  res.on('close', () => {
    if (!res.writableEnded) stats.streams_aborted++;
    closed = true;
    if (timer) clearTimeout(timer);
  });
  const step = () => {
    timer = null;
    if (closed) return;
    if (i < chunks) {
      res.write(i === 0 ? s.role + s.words[0] : s.words[i & 15]);
      stats.chunks++;
      i++;
      timer = setTimeout(step, delay);
    } else {
      res.end(i === 0 ? s.role + tail() : tail());
      stats.streams_done++;
    }
  };
  step();
}

const server = http.createServer((req, res) => {
  const url = req.url || '/';
  const path = url.split('?', 1)[0];
  if (req.method === 'GET' && (path === '/healthz' || path === '/stats')) {
    const out = Buffer.from(JSON.stringify(path === '/stats' ? stats : { status: 'ok' }));
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': out.length });
    res.end(out);
    return;
  }
  if (req.method !== 'POST' || !path.endsWith('/chat/completions')) {
    res.writeHead(404, { 'Content-Type': 'application/json', 'Content-Length': 2 });
    res.end('{}');
    return;
  }
  const parts = [];
  req.on('data', (c) => parts.push(c));
  req.on('end', () => {
    stats.requests++;
    let body;
    try {
      body = JSON.parse(parts.length === 1 ? parts[0] : Buffer.concat(parts));
    } catch {
      const out = '{"error":{"message":"bad json","type":"invalid_request_error"}}';
      res.writeHead(400, { 'Content-Type': 'application/json', 'Content-Length': out.length });
      res.end(out);
      return;
    }
    if (body.stream) {
      stream(req, res, body, url);
      return;
    }
    const out = strings(String(body.model ?? 'bench')).completion;
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': out.length });
    res.end(out);
  });
});
server.keepAliveTimeout = 300_000; // longer than any bench run: pooled connections stay open
server.headersTimeout = 310_000;
server.requestTimeout = 0;
server.maxHeadersCount = 100;
server.listen({ port: PORT, host: HOST, backlog: 4096 }, () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', () => { stop(); setTimeout(() => process.exit(0), 500).unref(); });
process.on('SIGINT', () => { stop(); setTimeout(() => process.exit(0), 500).unref(); });
