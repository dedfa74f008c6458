// switchboard browser client: a plain ES module (no build step) that also sets
// window.Switchboard. Served by the server at /client.js. Protocol: docs/protocol.md.

/** Close codes and what they mean to a person; the same table as docs/protocol.md. */
export const CLOSE_CODES = {
  1000: 'Normal closure: the connection finished its work.',
  1001: 'Going away: the server is shutting down or restarting (or the page is leaving).',
  1002: 'Protocol error: a frame broke the WebSocket protocol.',
  1003: 'Unsupported data: binary messages are not accepted; the protocol is JSON text.',
  1005: 'No status: the close frame carried no code.',
  1006: 'Abnormal closure: the connection dropped without a close frame (network lost, server gone).',
  1007: 'Invalid payload: a text message was not valid UTF-8.',
  1008: 'Policy violation: the server refused this connection by policy.',
  1009: 'Message too big: a message was over the server\'s size limit.',
  1011: 'Internal error: the server hit an unexpected condition.',
  1012: 'Service restart: the server is restarting.',
  1013: 'Try again later: the server is at capacity.',
  1015: 'TLS handshake failure.',
  4000: 'Heartbeat timeout: nothing arrived for too long, so the connection was considered dead.',
  4001: 'Slow consumer: messages were not read fast enough and the queue overflowed.',
  4002: 'Kicked: a backend disconnected this user.',
  4003: 'Token expired: sign in again to get a fresh token.',
};

/** Codes after which reconnecting would not help (1000 only when the app closed). */
export const TERMINAL_CODES = new Set([1008, 4002, 4003]);

/** A person-readable explanation of a close code. */
export function explainClose(code) {
  if (code in CLOSE_CODES) return CLOSE_CODES[code];
  if (code >= 4000 && code <= 4999) return `Application close code ${code}.`;
  if (code >= 3000 && code <= 3999) return `Library/framework close code ${code}.`;
  return `Unknown close code ${code}.`;
}

/** Whether to reconnect after a close. `byApp`: our own code called close(). */
export function shouldReconnect(code, byApp) {
  if (byApp) return false;
  return !TERMINAL_CODES.has(code);
}

/** Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)). */
export function backoffDelay(attempt, base = 500, cap = 30000, random = Math.random) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/**
 * The wait a server asked for in a close reason (`…; retry_after_ms=1234`: 1013 when it is
 * busy or full, 1001 during a staged drain), or null. The server already jittered it.
 */
export function retryAfterMs(reason) {
  const m = /retry_after_ms=(\d+)/.exec(reason || '');
  return m ? Math.min(Number(m[1]), 10 * 60 * 1000) : null;
}

/** A request waiting for the server's ack/error, or its timeout. */
export class Pending {
  constructor(timeoutMs, setTimer = (f, ms) => setTimeout(f, ms), clearTimer = (t) => clearTimeout(t)) {
    this.map = new Map();
    this.next = 1;
    this.timeoutMs = timeoutMs;
    this.setTimer = setTimer;
    this.clearTimer = clearTimer;
  }

  /** Registers a request; returns [id, promise]. */
  add() {
    const id = `c${this.next++}`;
    const promise = new Promise((resolve, reject) => {
      const timer = this.setTimer(() => {
        this.map.delete(id);
        const err = new Error(`no answer within ${this.timeoutMs} ms`);
        err.code = 'timeout';
        reject(err);
      }, this.timeoutMs);
      this.map.set(id, { resolve, reject, timer });
    });
    return [id, promise];
  }

  /** Settles a request from an `ack`, `error` or answer (`presence`) event; false if unknown. */
  settle(msg) {
    const p = this.map.get(msg.id);
    if (!p) return false;
    this.map.delete(msg.id);
    this.clearTimer(p.timer);
    if (msg.op !== 'error') {
      p.resolve(msg);
    } else {
      const err = new Error(msg.message || msg.code);
      err.code = msg.code;
      p.reject(err);
    }
    return true;
  }

  /** Fails every waiting request (the connection closed). */
  failAll(reason) {
    for (const [, p] of this.map) {
      this.clearTimer(p.timer);
      const err = new Error(reason);
      err.code = 'disconnected';
      p.reject(err);
    }
    this.map.clear();
  }
}

/**
 * Where a user's client is in the inbox stream, kept across reloads (localStorage when there
 * is one). `null` until the first stored message arrives: the next connection then resumes
 * from the user's confirmed position.
 */
export class InboxPosition {
  constructor(storage, key) {
    this.storage = storage;
    this.key = key;
    this.value = null;
    try {
      const raw = storage?.getItem(key);
      const v = raw ? JSON.parse(raw) : null;
      if (v && typeof v.epoch === 'string' && Number.isInteger(v.offset)) this.value = v;
    } catch {
      this.value = null;
    }
  }

  /** `since=` for the next connection. */
  since() {
    return this.value ? `${this.value.epoch}:${this.value.offset}` : 'confirmed';
  }

  /** True when `msg` (a stored message) is new; then it becomes the position. */
  advance(msg) {
    const v = this.value;
    if (v && v.epoch === msg.epoch && msg.offset <= v.offset) return false;
    this.set({ epoch: msg.epoch, offset: msg.offset });
    return true;
  }

  set(v) {
    this.value = v;
    try {
      if (v) this.storage?.setItem(this.key, JSON.stringify(v));
      else this.storage?.removeItem(this.key);
    } catch {
      /* storage full or disabled: the position lives for this page only */
    }
  }
}

function defaultStorage() {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null;
  }
}

/**
 * A switchboard connection that reconnects by itself.
 *
 *   const sb = new Switchboard('ws://127.0.0.1:8080/ws', {user: 'alice'});
 *   // A cluster: the URLs are tried in turn, moving on after every close or failed attempt.
 *   const sb2 = new Switchboard(['ws://n1:8081/ws', 'ws://n2:8082/ws'], {user: 'alice'});
 *   sb.on('message', (m) => ...); sb.on('close', (e) => console.log(e.explanation));
 *   await sb.send('bob', {text: 'hi'}); await sb.subscribe('room1');
 */
export class Switchboard {
  constructor(url, opts = {}) {
    this.urls = Array.isArray(url) ? [...url] : [url];
    if (this.urls.length === 0) throw new TypeError('Switchboard: no URL');
    this.urlIndex = 0;
    this.user = opts.user;
    this.token = opts.token;
    this.base = opts.backoffBaseMs ?? 500;
    this.cap = opts.backoffCapMs ?? 30000;
    this.heartbeatMs = opts.heartbeatMs ?? 20000;
    this.heartbeatTimeoutMs = opts.heartbeatTimeoutMs ?? 10000;
    this.WebSocketImpl = opts.WebSocket ?? globalThis.WebSocket;
    this.EventSourceImpl = opts.EventSource ?? globalThis.EventSource;
    this.sseFallback = opts.sseFallback ?? true;
    this.log = opts.logger ?? console;
    this.handlers = {};
    this.pending = new Pending(opts.ackTimeoutMs ?? 10000);
    /** channel → {joinLeave}: restored after every reconnect. */
    this.channels = new Map();
    this.attempt = 0;
    this.failuresBeforeOpen = 0;
    this.closedByApp = false;
    this.state = 'idle';
    this.ws = null;
    this.es = null;
    this.lastClose = null;
    /** The close that ended the last open connection (failed reconnect attempts do not replace it). */
    this.lastSessionClose = null;
    // Streams: resume the inbox after every reconnect, drop redelivered duplicates by offset,
    // confirm what was shown, and retry qos-1 sends with the same id until acknowledged.
    this.resume = opts.resume ?? Boolean(this.user || this.token);
    this.position = new InboxPosition(
      opts.storage === undefined ? defaultStorage() : opts.storage,
      `switchboard:inbox:${this.user ?? 'token'}`,
    );
    this.duplicates = 0;
    this.durable = new Map();
    this.durableNext = 1;
    this.durablePrefix = Math.random().toString(36).slice(2, 10);
    this.confirmDelayMs = opts.confirmDelayMs ?? 300;
    // Requests made before the connection is open wait here (bounded, each with a timeout)
    // and go out once it opens, as Socket.IO's buffer does.
    this.queued = [];
    this.maxQueued = opts.maxQueued ?? 1000;
    this.queueTimeoutMs = opts.queueTimeoutMs ?? 10000;
    if (typeof window !== 'undefined' && window.addEventListener) {
      const leave = () => this.close(1000, 'page closed');
      window.addEventListener('pagehide', leave);
      window.addEventListener('beforeunload', leave);
    }
    if (opts.autoConnect !== false) this.connect();
  }

  /**
   * Subscribes `fn` to 'message' | 'receipt' | 'open' | 'close' | 'reconnecting' | 'error' |
   * 'state' | 'resume' | 'join' | 'leave'. A 'receipt' (`{from, ids, upto}`) says `from`'s
   * client confirmed our qos-1 messages `ids` (the ids `send` promises carry as `.id`).
   */
  on(event, fn) {
    (this.handlers[event] ||= []).push(fn);
    return this;
  }

  emit(event, arg) {
    for (const fn of this.handlers[event] || []) {
      try {
        fn(arg);
      } catch (e) {
        this.log.error('[switchboard] handler failed', e);
      }
    }
  }

  setState(s) {
    this.state = s;
    this.emit('state', s);
  }

  /** The URL connected to now (one of the list). */
  get baseUrl() {
    return this.urls[this.urlIndex];
  }

  url() {
    const u = new URL(this.baseUrl, typeof location !== 'undefined' ? location.href : undefined);
    if (this.token) u.searchParams.set('token', this.token);
    else if (this.user) u.searchParams.set('user', this.user);
    if (this.resume) u.searchParams.set('since', this.position.since());
    return u.toString();
  }

  connect() {
    this.closedByApp = false;
    this.setState('connecting');
    let ws;
    try {
      ws = new this.WebSocketImpl(this.url());
    } catch (e) {
      this.emit('error', e);
      return this.scheduleReconnect(1006);
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.attempt = 0;
      this.failuresBeforeOpen = 0;
      this.wsWorked = true;
    };
    ws.onmessage = (e) => this.onFrame(e.data);
    ws.onerror = (e) => this.emit('error', e);
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (!opened) this.failuresBeforeOpen++;
      this.onClosed(e.code, e.reason, e.wasClean, opened);
    };
  }

  onFrame(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return this.emit('error', new Error('server sent non-JSON data'));
    }
    switch (msg.op) {
      case 'welcome':
        this.welcome = msg;
        if (msg.inbox && msg.inbox.recovered === false) {
          // The history behind our position is gone (or trimmed): say so, start over from
          // the confirmed position next time.
          if (msg.inbox.reason === 'epoch_changed') this.position.set(null);
          this.emit('resume', { recovered: false, reason: msg.inbox.reason });
        }
        this.setState('open');
        this.startHeartbeat();
        // Restore subscriptions after a reconnect (settling `subscribe` calls made before).
        for (const [c, o] of this.channels) {
          const waiting = o.waiting ?? [];
          o.waiting = [];
          this.request(subBody(c, o)).then(
            (v) => waiting.forEach((w) => w.resolve(v)),
            (e) => waiting.forEach((w) => w.reject(e)),
          );
        }
        // qos-1 sends not yet acknowledged go again with the same id (stored once).
        for (const [, d] of this.durable) this.ws.send(JSON.stringify(d.body));
        // Requests made while not connected, in the order they were made.
        for (const q of this.queued.splice(0)) {
          clearTimeout(q.timer);
          this.request(q.body).then(q.resolve, q.reject);
        }
        this.emit('open', msg);
        break;
      case 'ack':
      case 'error':
        if (this.settleDurable(msg)) break;
        if (!this.pending.settle(msg) && msg.op === 'error') this.emit('error', msg);
        break;
      case 'presence':
        this.pending.settle(msg);
        break;
      case 'join':
      case 'leave':
        // {channel, user, conn}: only for subscriptions made with {joinLeave: true}.
        this.emit(msg.op, msg);
        break;
      case 'pong':
        this.lastPong = Date.now();
        this.awaitingPong = false;
        clearTimeout(this.heartbeatDeadline);
        break;
      default:
        if (msg.stream === 'inbox' && Number.isInteger(msg.offset)) {
          if (!this.position.advance(msg)) {
            this.duplicates++;
            return;
          }
          this.scheduleConfirm();
        }
        this.emit(msg.op === 'receipt' ? 'receipt' : 'message', msg);
    }
  }

  /** Confirms the inbox up to the newest message shown, a moment after it was shown. */
  scheduleConfirm() {
    clearTimeout(this.confirmTimer);
    this.confirmTimer = setTimeout(() => {
      const v = this.position.value;
      if (v && this.ws && this.ws.readyState === 1 && this.state === 'open') {
        this.ws.send(JSON.stringify({ op: 'ack', stream: 'inbox', offset: v.offset }));
      }
    }, this.confirmDelayMs);
  }

  /** Settles a qos-1 send from its ack or error; false when `msg` is not about one. */
  settleDurable(msg) {
    const d = this.durable.get(msg.id);
    if (!d) return false;
    if (msg.op === 'error' && msg.code === 'overloaded') return true; // retried at reconnect
    this.durable.delete(msg.id);
    if (msg.op === 'ack') {
      // Our own message is the next one in our inbox: no need to get it back on resume.
      const v = this.position.value;
      if (v && v.epoch === msg.epoch && msg.offset === v.offset + 1) {
        this.position.set({ epoch: msg.epoch, offset: msg.offset });
      }
      d.resolve(msg);
    }
    else {
      const err = new Error(msg.message || msg.code);
      err.code = msg.code;
      d.reject(err);
    }
    return true;
  }

  /** `opened`: false for an attempt that never opened (the event says so, `ev.opened`). */
  onClosed(code, reason, wasClean, opened = true) {
    this.stopHeartbeat();
    this.pending.failAll(`connection closed (${code})`);
    const byApp = this.closedByApp;
    const willReconnect = shouldReconnect(code, byApp);
    const explanation = explainClose(code);
    const ev = { code, reason, wasClean, explanation, willReconnect, opened };
    this.lastClose = ev;
    if (opened) this.lastSessionClose = ev;
    const line = `[switchboard] closed code=${code} reason=${JSON.stringify(reason || '')} wasClean=${wasClean} — ${explanation}`;
    if (code === 1000 || code === 1001) this.log.info(line);
    else this.log.warn(line);
    this.setState('closed');
    this.emit('close', ev);
    if (!willReconnect) return;
    // Only where WebSocket never opened (a proxy that blocks it): failures after it worked
    // on this page are the server's (a restart), and SSE would not fare better.
    if (this.sseFallback && !this.wsWorked && this.failuresBeforeOpen >= 3 && this.EventSourceImpl && !this.es) {
      return this.startEventSource();
    }
    this.scheduleReconnect(code, retryAfterMs(reason));
  }

  /** `serverWaitMs`: the server's own retry-after, honoured when longer than the backoff. */
  scheduleReconnect(code, serverWaitMs = null) {
    // With several URLs (cluster nodes), the next attempt goes to the next one.
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    const delay = Math.max(backoffDelay(this.attempt++, this.base, this.cap), serverWaitMs ?? 0);
    this.setState('reconnecting');
    this.emit('reconnecting', { attempt: this.attempt, delayMs: delay, code });
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  /** Receive-only fallback over Server-Sent Events when WebSocket keeps failing. */
  startEventSource() {
    const u = new URL(this.url());
    u.pathname = u.pathname.replace(/\/ws$/, '/events');
    u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
    // The stream resumes from our position; EventSource's own reconnects send Last-Event-ID.
    for (const [c] of this.channels) u.searchParams.append('channel', c);
    this.log.warn('[switchboard] WebSocket keeps failing; receiving over Server-Sent Events');
    const es = new this.EventSourceImpl(u.toString());
    this.es = es;
    es.onopen = () => this.setState('open-sse');
    es.onmessage = (e) => this.onFrame(e.data);
    es.onerror = (e) => this.emit('error', e);
  }

  startHeartbeat() {
    this.stopHeartbeat();
    this.awaitingPong = false;
    this.heartbeatTimer = setInterval(() => {
      // One ping at a time: while one is unanswered its deadline stands.
      if (!this.ws || this.ws.readyState !== 1 || this.awaitingPong) return;
      this.awaitingPong = true;
      this.ws.send(JSON.stringify({ op: 'ping', data: Date.now() }));
      // No pong in time: the connection is half-open even if the browser has not noticed.
      this.heartbeatDeadline = setTimeout(() => this.declareDead(), this.heartbeatTimeoutMs);
    }, this.heartbeatMs);
  }

  stopHeartbeat() {
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.heartbeatDeadline);
  }

  declareDead() {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    try {
      ws.close(4000, 'no pong');
    } catch {
      /* already closing */
    }
    this.onClosed(4000, 'no pong from the server in time', false);
  }

  /** Whether requests can go out now. */
  get isOpen() {
    return Boolean(this.ws && this.ws.readyState === 1 && this.state === 'open');
  }

  /**
   * Sends `body` with a fresh id; resolves on its ack. Before the connection is open (or
   * while it reconnects) the request waits in a bounded queue and goes out once open; it
   * rejects with `queue_full` over `maxQueued`, `timeout` after `queueTimeoutMs`, `closed` on
   * `close()`, and `not_connected` on a receive-only SSE fallback.
   */
  request(body) {
    if (!this.isOpen) {
      const fail = (code, message) => Object.assign(new Error(message), { code });
      if (this.es) return Promise.reject(fail('not_connected', 'receive-only (SSE fallback)'));
      if (this.closedByApp) return Promise.reject(fail('closed', 'closed by the app'));
      if (this.queued.length >= this.maxQueued) {
        return Promise.reject(fail('queue_full', `${this.maxQueued} requests already wait for the connection`));
      }
      return new Promise((resolve, reject) => {
        const q = { body, resolve, reject };
        q.timer = setTimeout(() => {
          this.queued = this.queued.filter((x) => x !== q);
          reject(fail('timeout', `not connected within ${this.queueTimeoutMs} ms`));
        }, this.queueTimeoutMs);
        this.queued.push(q);
      });
    }
    const [id, promise] = this.pending.add();
    this.ws.send(JSON.stringify({ ...body, id }));
    return promise;
  }

  /**
   * Direct message to every connection of `to`; resolves on the server's ack. With
   * `{qos: 1}` the message is stored first: the promise resolves on the durable ack
   * (`{offset, epoch, queued}`), and while disconnected the send waits and is retried with
   * the same id after every reconnect (the server stores it once).
   */
  send(to, data, opts = {}) {
    if (opts.qos !== 1) return this.request({ op: 'send', to, data });
    const id = `d-${this.durablePrefix}-${this.durableNext++}`;
    const body = { op: 'send', to, data, qos: 1, id };
    const promise = new Promise((resolve, reject) => this.durable.set(id, { body, resolve, reject }));
    if (this.isOpen) this.ws.send(JSON.stringify(body));
    // The id a later 'receipt' names.
    promise.id = id;
    return promise;
  }

  /** Publishes to a channel; resolves on the server's ack. */
  publish(channel, data) {
    return this.request({ op: 'pub', channel, data });
  }

  /**
   * Joins a channel (restored after every reconnect). With `{joinLeave: true}`, the
   * channel's `join`/`leave` events come as `sb.on('join'|'leave', ({channel, user}) => ..)`
   * (channels whose server rule has `join_leave = true`).
   */
  subscribe(channel, opts = {}) {
    const o = { joinLeave: opts.joinLeave === true, waiting: [] };
    this.channels.set(channel, o);
    if (this.isOpen) return this.request(subBody(channel, o));
    // Sent (once) with the other subscriptions when the connection opens; settles then.
    return new Promise((resolve, reject) => {
      const w = { resolve, reject };
      const timer = setTimeout(() => {
        o.waiting = o.waiting.filter((x) => x !== w);
        reject(Object.assign(new Error(`not connected within ${this.queueTimeoutMs} ms`), { code: 'timeout' }));
      }, this.queueTimeoutMs);
      w.resolve = (v) => { clearTimeout(timer); resolve(v); };
      w.reject = (e) => { clearTimeout(timer); reject(e); };
      o.waiting.push(w);
    });
  }

  /** Who is subscribed to `channel` (every node): resolves `{subscribers, anonymous, members: [{user, connections}], complete}`. */
  presence(channel) {
    return this.request({ op: 'presence', channel });
  }

  /** Leaves a channel. */
  unsubscribe(channel) {
    this.channels.delete(channel);
    if (this.state !== 'open') return Promise.resolve({ queued: true });
    return this.request({ op: 'unsub', channel });
  }

  /** Closes for good (no reconnect). */
  close(code = 1000, reason = 'closed by the app') {
    this.closedByApp = true;
    for (const q of this.queued.splice(0)) {
      clearTimeout(q.timer);
      q.reject(Object.assign(new Error('closed by the app'), { code: 'closed' }));
    }
    clearTimeout(this.reconnectTimer);
    this.stopHeartbeat();
    if (this.es) {
      this.es.close();
      this.es = null;
    }
    if (this.ws && this.ws.readyState <= 1) this.ws.close(code, reason);
  }
}

/** The `sub` request of a channel with its options. */
function subBody(channel, o) {
  return o.joinLeave ? { op: 'sub', channel, join_leave: true } : { op: 'sub', channel };
}

if (typeof window !== 'undefined') window.Switchboard = Switchboard;
