// Load generator for the gateway benchmark: raw HTTP/1.1 over persistent keep-alive sockets.
//
//   node bench/loadgen.mjs '<json spec>'      -> prints one JSON result line on stdout
//
// Phases (spec.phase):
//   latency  one connection per target, requests alternate gateway / direct (concurrency 1)
//   load     closed loop: `concurrency` connections each send back-to-back requests until
//            `count` requests were sent or `duration_s` passed
//   stream   like load, for streamed requests: time to first token, total time, chunks seen;
//            with `all_at_once` every connection sends one stream at the same moment (used for
//            the 500 slow streams), and `rss_pid` samples that process's VmRSS meanwhile
//
// Every phase is bounded: it stops issuing at count or duration, and a watchdog destroys all
// sockets at `timeout_s`, so a stuck server cannot keep the run alive.
// Loopback only: hosts other than 127.0.0.1 are refused.

import fs from 'node:fs';
import net from 'node:net';

const now = () => Number(process.hrtime.bigint()) / 1e6; // ms

// ---------------------------------------------------------------- /proc helpers
// CPU time of a process in seconds: the scheduler's own runtime of each of its threads
// (/proc/<pid>/task/*/schedstat, in ns). utime + stime in /proc/<pid>/stat are sampled at the
// timer tick on kernels with tick accounting, and a process woken in step with the tick (as
// one fed by timer-paced chunks is) can be charged far more or far less than it ran.
function cpuSeconds(pid) {
  if (!pid) return null;
  try {
    let ns = 0;
    for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
      try {
        ns += Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'latin1').split(' ')[0]);
      } catch {
        // a thread that ended between the listing and the read
      }
    }
    return ns / 1e9;
  } catch {
    return null;
  }
}
function rssKb(pid) {
  try {
    const m = /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'latin1'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}
function coreTimes() {
  // per-core [busy, total] jiffies from /proc/stat
  const out = {};
  for (const line of fs.readFileSync('/proc/stat', 'latin1').split('\n')) {
    const m = /^cpu(\d+)\s+(.*)$/.exec(line);
    if (!m) continue;
    const v = m[2].trim().split(/\s+/).map(Number);
    const idle = v[3] + (v[4] || 0);
    const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
    out[m[1]] = [total - idle, total, v[5] + v[6]]; // busy, total, irq + softirq
  }
  return out;
}
function snapshot(pids) {
  const o = { t: now(), self: process.cpuUsage(), cores: coreTimes() };
  for (const [k, pid] of Object.entries(pids || {})) o[k] = cpuSeconds(pid);
  return o;
}
function cpuDelta(a, b, pids) {
  const wall = (b.t - a.t) / 1000;
  const out = { wall_s: wall };
  for (const k of Object.keys(pids || {})) {
    if (a[k] != null && b[k] != null) out[`${k}_cpu_s`] = b[k] - a[k];
  }
  out.loadgen_cpu_s = (b.self.user + b.self.system - a.self.user - a.self.system) / 1e6;
  out.core_busy = {};
  out.core_irq = {};
  for (const c of Object.keys(b.cores)) {
    const [b1, t1, i1] = b.cores[c];
    const [b0, t0, i0] = a.cores[c] || [0, 0, 0];
    out.core_busy[c] = t1 > t0 ? (b1 - b0) / (t1 - t0) : null;
    out.core_irq[c] = t1 > t0 ? (i1 - i0) / (t1 - t0) : null;
  }
  return out;
}

// ---------------------------------------------------------------- HTTP/1.1 client
class Conn {
  constructor(host, port) {
    if (host !== '127.0.0.1') throw new Error('loopback only');
    this.host = host;
    this.port = port;
    this.buf = null;
    this.cur = null;
    this.closed = false;
  }

  open() {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: this.host, port: this.port });
      this.sock = s;
      s.setNoDelay(true);
      s.once('connect', () => resolve(this));
      s.once('error', (e) => { this.closed = true; this.fail(e); reject(e); });
      s.on('data', (d) => this.onData(d));
      s.on('close', () => {
        this.closed = true;
        if (this.cur && this.cur.state === 'eof') this.finish();
        else this.fail(new Error('connection closed'));
      });
    });
  }

  destroy() { this.sock?.destroy(); }

  // handler: {onBody(piece: Buffer, t: ms)}; resolves {status, t0, tHead, tEnd, bytes}
  request(raw, handler) {
    return new Promise((resolve, reject) => {
      if (this.closed) { reject(new Error('connection closed')); return; }
      this.cur = { resolve, reject, handler, state: 'head', t0: now(), bytes: 0, status: 0 };
      this.sock.write(raw);
    });
  }

  fail(e) {
    const c = this.cur;
    this.cur = null;
    if (c) c.reject(e);
  }

  finish() {
    const c = this.cur;
    this.cur = null;
    c.tEnd = now();
    c.resolve(c);
  }

  body(piece) {
    const c = this.cur;
    c.bytes += piece.length;
    if (c.handler) c.handler.onBody(piece, c);
  }

  onData(d) {
    this.buf = this.buf && this.buf.length ? Buffer.concat([this.buf, d]) : d;
    while (this.cur && this.buf && this.buf.length) {
      const c = this.cur;
      const b = this.buf;
      if (c.state === 'head') {
        const i = b.indexOf('\r\n\r\n');
        if (i < 0) return;
        const head = b.toString('latin1', 0, i).toLowerCase();
        this.buf = b.subarray(i + 4);
        c.tHead = now();
        c.status = Number(head.slice(9, 12));
        const cl = /\r\ncontent-length:\s*(\d+)/.exec(head);
        if (/\r\ntransfer-encoding:[^\r]*chunked/.test(head)) c.state = 'size';
        else if (cl) { c.left = Number(cl[1]); c.state = 'len'; }
        else c.state = 'eof';
        if (c.state === 'len' && c.left === 0) { this.finish(); }
      } else if (c.state === 'len') {
        const n = Math.min(c.left, b.length);
        this.body(b.subarray(0, n));
        this.buf = b.subarray(n);
        c.left -= n;
        if (c.left === 0) this.finish();
      } else if (c.state === 'size') {
        const i = b.indexOf('\r\n');
        if (i < 0) return;
        const size = parseInt(b.toString('latin1', 0, i).split(';')[0], 16);
        this.buf = b.subarray(i + 2);
        if (size === 0) c.state = 'trailer';
        else { c.left = size; c.state = 'data'; }
      } else if (c.state === 'data') {
        const n = Math.min(c.left, b.length);
        this.body(b.subarray(0, n));
        this.buf = b.subarray(n);
        c.left -= n;
        if (c.left === 0) c.state = 'crlf';
      } else if (c.state === 'crlf') {
        if (b.length < 2) return;
        this.buf = b.subarray(2);
        c.state = 'size';
      } else if (c.state === 'trailer') {
        const i = b.indexOf('\r\n');
        if (i < 0) return;
        this.buf = b.subarray(i + 2);
        if (i === 0) this.finish(); // blank line ends the trailers
      } else if (c.state === 'eof') {
        this.body(b);
        this.buf = null;
      }
    }
  }
}

// ---------------------------------------------------------------- request bodies
function requestBytes(t, stream, maxTokens) {
  let path, body;
  if (t.kind === 'gateway') {
    path = '/v1/messages';
    body = { model: 'claude-bench', max_tokens: maxTokens, messages: [{ role: 'user', content: 'hi' }], stream };
  } else {
    // What the gateway sends the backend for the same request.
    path = '/v1/chat/completions';
    body = { model: 'claude-bench', messages: [{ role: 'user', content: 'hi' }], max_tokens: maxTokens };
    if (stream) { body.stream = true; body.stream_options = { include_usage: true }; }
  }
  const b = Buffer.from(JSON.stringify(body));
  const head = `POST ${path} HTTP/1.1\r\nHost: ${t.host}:${t.port}\r\nContent-Type: application/json\r\n` +
    `Accept: ${stream ? 'text/event-stream' : 'application/json'}\r\n` +
    (t.kind === 'gateway' ? 'anthropic-version: 2023-06-01\r\n' : '') +
    (t.api_key ? `x-api-key: ${t.api_key}\r\n` : '') +
    `Content-Length: ${b.length}\r\n\r\n`;
  return Buffer.concat([Buffer.from(head, 'latin1'), b]);
}

// Non-streamed: keep the first bytes to check the answer is a real message / completion.
function jsonHandler(kind) {
  return {
    kind,
    onBody(piece, c) {
      if (!c.text) c.text = piece.toString('latin1', 0, Math.min(piece.length, 64));
    },
    ok(c) {
      if (c.status !== 200) return false;
      return kind === 'gateway' ? c.text.includes('"type":"message"') : c.text.includes('chat.completion');
    },
  };
}

// Streamed: time of the first token, and the number of content chunks / deltas at the end.
const GW_DELTA = 'event: content_block_delta';
const DIRECT_FIRST = /"delta":\{"content":"[^"]/;
function streamHandler(kind) {
  return {
    kind,
    onBody(piece, c) {
      const s = piece.toString('latin1');
      c.text = c.text ? c.text + s : s;
      if (c.tFirst === undefined) {
        const from = Math.max(0, (c.scanned || 0) - 40);
        const hit = kind === 'gateway'
          ? c.text.indexOf(GW_DELTA, from) >= 0
          : DIRECT_FIRST.test(c.text.slice(from));
        if (hit) c.tFirst = now();
        c.scanned = c.text.length;
      }
    },
    count(c) {
      const t = c.text || '';
      const needle = kind === 'gateway' ? GW_DELTA : '"delta":{"content":"t';
      let n = 0;
      for (let i = t.indexOf(needle); i >= 0; i = t.indexOf(needle, i + needle.length)) n++;
      const complete = kind === 'gateway'
        ? t.includes('event: message_stop') && !t.includes('event: error')
        : t.includes('data: [DONE]');
      return { n, complete };
    },
  };
}

// ---------------------------------------------------------------- stats
function pct(sorted, p) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}
function summary(arr) {
  const s = Float64Array.from(arr).sort();
  const mean = s.length ? s.reduce((a, b) => a + b, 0) / s.length : null;
  return { n: s.length, mean, p50: pct(s, 50), p90: pct(s, 90), p99: pct(s, 99), max: s.length ? s[s.length - 1] : null };
}

async function openConns(t, n) {
  const conns = [];
  // In batches, so a listen backlog is never the thing measured.
  for (let i = 0; i < n; i += 64) {
    const batch = [];
    for (let j = i; j < Math.min(n, i + 64); j++) batch.push(new Conn(t.host, t.port).open());
    conns.push(...(await Promise.all(batch)));
  }
  return conns;
}

function watchdog(conns, timeoutS) {
  const timer = setTimeout(() => { for (const c of conns) c.destroy(); }, timeoutS * 1000);
  return () => clearTimeout(timer);
}

// ---------------------------------------------------------------- phases
async function phaseLatency(spec) {
  const targets = spec.targets;
  const conns = [];
  for (const t of targets) conns.push((await openConns(t, 1))[0]);
  const stop = watchdog(conns, spec.timeout_s);
  const reqs = targets.map((t) => requestBytes(t, false, spec.max_tokens));
  const handlers = targets.map((t) => jsonHandler(t.kind));
  const lat = targets.map(() => []);
  const errors = targets.map(() => 0);
  const deadline = now() + spec.duration_s * 1000;
  try {
    for (let w = 0; w < spec.warmup; w++) {
      for (let k = 0; k < targets.length; k++) await conns[k].request(reqs[k], handlers[k]);
    }
    for (let i = 0; i < spec.count && now() < deadline; i++) {
      // Alternate which target goes first, so neither always follows the other.
      for (let j = 0; j < targets.length; j++) {
        const k = (i + j) % targets.length;
        const c = await conns[k].request(reqs[k], handlers[k]);
        if (handlers[k].ok(c)) lat[k].push(c.tEnd - c.t0);
        else errors[k]++;
      }
    }
  } catch (e) {
    errors[0] += 1;
  }
  stop();
  for (const c of conns) c.destroy();
  const out = {};
  targets.forEach((t, k) => { out[t.kind] = { ...summary(lat[k]), errors: errors[k] }; });
  return out;
}

async function phaseLoad(spec) {
  const t = spec.target;
  const stream = !!spec.stream;
  const conns = await openConns(t, spec.concurrency);
  const stop = watchdog(conns, spec.timeout_s);
  const req = requestBytes(t, stream, spec.max_tokens);
  const h = stream ? streamHandler(t.kind) : jsonHandler(t.kind);
  const lat = [];
  const ttft = [];
  let errors = 0;
  let incomplete = 0;
  let chunks = 0;
  let completed = 0;
  const errorSamples = [];
  const noteError = (what) => { errors++; if (errorSamples.length < 5) errorSamples.push(what); };

  // Warm each connection (and the server side of it) before measuring.
  if (spec.warmup) {
    await Promise.all(conns.map((c) => c.request(req, h).catch(() => noteError('warmup'))));
  }

  let rss = null;
  let rssTimer = null;
  const rssSamples = [];
  if (spec.rss_pid) {
    rss = { idle_kb: rssKb(spec.rss_pid), peak_kb: 0 };
    rssTimer = setInterval(() => {
      const v = rssKb(spec.rss_pid);
      if (v != null) { rssSamples.push(v); if (v > rss.peak_kb) rss.peak_kb = v; }
    }, spec.rss_interval_ms || 20);
  }

  let issued = 0;
  const deadline = now() + spec.duration_s * 1000;
  const a = snapshot(spec.pids);
  const one = async (c) => {
    issued++;
    let r;
    try {
      r = await c.request(req, h);
    } catch (e) {
      noteError(String(e.message || e));
      return false;
    }
    if (!stream) {
      if (h.ok(r)) { lat.push(r.tEnd - r.t0); completed++; } else noteError(`status ${r.status}`);
      return true;
    }
    const { n, complete } = h.count(r);
    chunks += n;
    if (r.status !== 200) { noteError(`status ${r.status}`); return true; }
    if (!complete || (spec.expect_chunks && n !== spec.expect_chunks)) {
      incomplete++;
      if (errorSamples.length < 5) errorSamples.push(`incomplete: ${n} chunks`);
      return true;
    }
    completed++;
    lat.push(r.tEnd - r.t0);
    if (r.tFirst !== undefined) ttft.push(r.tFirst - r.t0);
    return true;
  };
  const loop = async (c) => {
    if (spec.all_at_once) { await one(c); return; }
    while (issued < spec.count && now() < deadline) {
      if (!(await one(c))) return; // a dead connection ends this loop
    }
  };
  await Promise.all(conns.map(loop));
  const b = snapshot(spec.pids);
  if (rssTimer) {
    clearInterval(rssTimer);
    rss.after_kb = rssKb(spec.rss_pid);
  }
  stop();
  for (const c of conns) c.destroy();
  const cpu = cpuDelta(a, b, spec.pids);
  return {
    issued,
    completed,
    errors,
    incomplete,
    error_samples: errorSamples,
    chunks,
    elapsed_s: cpu.wall_s,
    rps: completed / cpu.wall_s,
    latency_ms: summary(lat),
    ttft_ms: stream ? summary(ttft) : undefined,
    cpu,
    rss,
  };
}

const spec = JSON.parse(process.argv[2]);
const fn = { latency: phaseLatency, load: phaseLoad, stream: (s) => phaseLoad({ ...s, stream: true }) }[spec.phase];
if (!fn) { console.error(`unknown phase ${spec.phase}`); process.exit(2); }
const hardStop = setTimeout(() => { console.error('loadgen: hard timeout'); process.exit(3); }, (spec.timeout_s + 10) * 1000);
fn(spec).then((r) => {
  clearTimeout(hardStop);
  process.stdout.write(JSON.stringify(r) + '\n');
  process.exit(0);
}, (e) => {
  console.error(`loadgen: ${e.stack || e}`);
  process.exit(1);
});
