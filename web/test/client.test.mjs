// Unit tests of the browser client's logic under Node's built-in test runner.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  backoffDelay, explainClose, shouldReconnect, Pending, Switchboard, CLOSE_CODES, TERMINAL_CODES,
  retryAfterMs,
} from '../client.js';
import { readFileSync } from 'node:fs';

test('backoff grows exponentially up to the cap, with full jitter', () => {
  // random() = 0.999… gives the ceiling; 0 gives 0.
  const top = () => 0.999999;
  assert.equal(backoffDelay(0, 100, 5000, top), 99);
  assert.equal(backoffDelay(3, 100, 5000, top), 799);
  assert.equal(backoffDelay(10, 100, 5000, top), 4999);
  assert.equal(backoffDelay(5, 100, 5000, () => 0), 0);
  const draws = Array.from({ length: 500 }, () => backoffDelay(4, 100, 5000));
  assert.ok(draws.every((d) => d >= 0 && d < 1600));
  assert.ok(Math.min(...draws) < 400 && Math.max(...draws) > 1200, 'spread over the range');
});

test('a retry_after_ms in a close reason is read and bounded', () => {
  assert.equal(retryAfterMs('server busy, try again later; retry_after_ms=1234'), 1234);
  assert.equal(retryAfterMs('server shutting down'), null);
  assert.equal(retryAfterMs(''), null);
  assert.equal(retryAfterMs('x; retry_after_ms=99999999'), 600000);
});

test('close table explains every documented code, and terminal codes stop reconnects', () => {
  for (const code of [1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1013, 4000, 4001, 4002, 4003]) {
    assert.ok(CLOSE_CODES[code], `code ${code} documented`);
    assert.equal(explainClose(code), CLOSE_CODES[code]);
  }
  assert.match(explainClose(4321), /Application close code 4321/);
  assert.match(explainClose(2999), /Unknown/);
  for (const c of [1008, 4002, 4003]) assert.equal(shouldReconnect(c, false), false);
  assert.equal(shouldReconnect(1000, true), false, 'the app closed it');
  for (const c of [1000, 1001, 1006, 1011, 1013, 4000, 4001]) assert.equal(shouldReconnect(c, false), true);
  assert.deepEqual([...TERMINAL_CODES].sort(), [1008, 4002, 4003]);
});

test('the close table matches docs/protocol.md', () => {
  const doc = readFileSync(new URL('../../docs/protocol.md', import.meta.url), 'utf8');
  const table = doc.slice(doc.indexOf('## Close codes'), doc.indexOf('## HTTP on the same port'));
  const documented = [...table.matchAll(/^\| (\d{4}) \|/gm)].map((m) => Number(m[1]));
  assert.ok(documented.length >= 14);
  for (const code of documented) assert.ok(CLOSE_CODES[code], `client explains ${code}`);
});

test('pending requests resolve on ack, reject on error and on timeout', async () => {
  const p = new Pending(30);
  const [id1, ok] = p.add();
  const [id2, bad] = p.add();
  const [, slow] = p.add();
  assert.notEqual(id1, id2);
  assert.ok(p.settle({ op: 'ack', id: id1 }));
  assert.deepEqual(await ok, { op: 'ack', id: id1 });
  p.settle({ op: 'error', id: id2, code: 'user_offline', message: 'bob is offline' });
  await assert.rejects(bad, (e) => e.code === 'user_offline' && e.message === 'bob is offline');
  await assert.rejects(slow, (e) => e.code === 'timeout');
  assert.equal(p.settle({ op: 'ack', id: 'unknown' }), false);
});

/** A fake WebSocket the tests drive by hand. */
class FakeWS {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWS.all.push(this);
  }
  send(s) { this.sent.push(JSON.parse(s)); }
  close(code, reason) { this.readyState = 3; this.closedWith = { code, reason }; queueMicrotask(() => this.onclose?.({ code, reason, wasClean: true })); }
  open() { this.readyState = 1; this.onopen?.(); }
  recv(obj) { this.onmessage?.({ data: JSON.stringify(obj) }); }
  drop(code, reason = '') { this.readyState = 3; this.onclose?.({ code, reason, wasClean: code !== 1006 }); }
}

const quiet = { info() {}, warn() {}, error() {} };

test('send resolves on ack and rejects with the server error; subscriptions are restored', async () => {
  FakeWS.all = [];
  const logs = [];
  const sb = new Switchboard('ws://x/ws', {
    user: 'alice', WebSocket: FakeWS, backoffBaseMs: 1, backoffCapMs: 2, heartbeatMs: 60000,
    logger: { info: (l) => logs.push(l), warn: (l) => logs.push(l), error() {} },
  });
  const ws = FakeWS.all[0];
  assert.match(ws.url, /user=alice/);
  ws.open();
  ws.recv({ op: 'welcome', user: 'alice', conn: '0.1.1', ping_interval_ms: 25000 });
  const sub = sb.subscribe('room1');
  ws.recv({ op: 'ack', id: ws.sent[0].id });
  await sub;
  const ok = sb.send('bob', { t: 1 });
  const sent = ws.sent.at(-1);
  assert.deepEqual({ op: sent.op, to: sent.to, data: sent.data }, { op: 'send', to: 'bob', data: { t: 1 } });
  ws.recv({ op: 'ack', id: sent.id });
  await ok;
  const off = sb.send('carol', 1);
  ws.recv({ op: 'error', id: ws.sent.at(-1).id, code: 'user_offline', message: 'carol is offline' });
  await assert.rejects(off, (e) => e.code === 'user_offline');

  const closes = [];
  sb.on('close', (e) => closes.push(e));
  const reconnecting = new Promise((r) => sb.on('reconnecting', r));
  ws.drop(1001, 'server shutting down');
  assert.equal(closes[0].code, 1001);
  assert.equal(closes[0].willReconnect, true);
  assert.equal(closes[0].opened, true);
  assert.match(closes[0].explanation, /shutting down/);
  assert.ok(logs.some((l) => l.includes('code=1001') && l.includes('wasClean=true')), 'close logged');
  await reconnecting;
  await new Promise((r) => setTimeout(r, 20));
  // An attempt that never opens is a close too, but not the one that ended the session.
  const reconnectingAgain = new Promise((r) => sb.on('reconnecting', r));
  FakeWS.all[1].drop(1006);
  assert.equal(closes[1].opened, false);
  assert.equal(sb.lastClose.code, 1006);
  assert.equal(sb.lastSessionClose.code, 1001);
  await reconnectingAgain;
  await new Promise((r) => setTimeout(r, 20));
  const ws2 = FakeWS.all[2];
  assert.ok(ws2, 'reconnected');
  ws2.open();
  ws2.recv({ op: 'welcome', user: 'alice', conn: '0.2.1', ping_interval_ms: 25000 });
  assert.deepEqual(ws2.sent.map((m) => [m.op, m.channel]), [['sub', 'room1']], 'subscription restored');
  sb.close();
});

test('presence resolves with the members; join/leave events come only as join/leave', async () => {
  FakeWS.all = [];
  const sb = new Switchboard('ws://x/ws', {
    user: 'alice', WebSocket: FakeWS, backoffBaseMs: 1, backoffCapMs: 2, heartbeatMs: 60000, logger: quiet,
  });
  const ws = FakeWS.all[0];
  ws.open();
  ws.recv({ op: 'welcome', user: 'alice', conn: '0.1.1', ping_interval_ms: 25000 });
  const sub = sb.subscribe('chat', { joinLeave: true });
  assert.deepEqual(ws.sent[0], { op: 'sub', channel: 'chat', join_leave: true, id: ws.sent[0].id });
  ws.recv({ op: 'ack', id: ws.sent[0].id });
  await sub;
  const who = sb.presence('chat');
  const ask = ws.sent.at(-1);
  assert.deepEqual({ op: ask.op, channel: ask.channel }, { op: 'presence', channel: 'chat' });
  const members = [{ user: 'alice', connections: 1 }];
  ws.recv({ op: 'presence', id: ask.id, channel: 'chat', subscribers: 1, anonymous: 0, members, complete: true });
  assert.deepEqual((await who).members, members);
  const seen = [];
  sb.on('join', (e) => seen.push(['join', e.user]));
  sb.on('leave', (e) => seen.push(['leave', e.user]));
  sb.on('message', (m) => seen.push(['message', m.op]));
  ws.recv({ op: 'join', channel: 'chat', user: 'bob', conn: '1.2.3' });
  ws.recv({ op: 'leave', channel: 'chat', user: 'bob', conn: '1.2.3' });
  assert.deepEqual(seen, [['join', 'bob'], ['leave', 'bob']]);
  // A reconnect asks for the events again.
  ws.drop(1001, 'server shutting down');
  for (let i = 0; i < 500 && FakeWS.all.length < 2; i++) await new Promise((r) => setTimeout(r, 2));
  const ws2 = FakeWS.all[1];
  assert.ok(ws2, 'reconnected');
  ws2.open();
  ws2.recv({ op: 'welcome', user: 'alice', conn: '0.2.1', ping_interval_ms: 25000 });
  assert.equal(ws2.sent[0].join_leave, true);
  sb.close();
});

test('no reconnect after a terminal code or an app close', async () => {
  FakeWS.all = [];
  const sb = new Switchboard('ws://x/ws', { user: 'a', WebSocket: FakeWS, backoffBaseMs: 1, logger: quiet });
  FakeWS.all[0].open();
  FakeWS.all[0].recv({ op: 'welcome', user: 'a', conn: 'c', ping_interval_ms: 1 });
  const closed = new Promise((r) => sb.on('close', r));
  FakeWS.all[0].drop(4002, 'kicked');
  const ev = await closed;
  assert.equal(ev.willReconnect, false);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(FakeWS.all.length, 1);

  FakeWS.all = [];
  const sb2 = new Switchboard('ws://x/ws', { user: 'b', WebSocket: FakeWS, backoffBaseMs: 1, logger: quiet });
  FakeWS.all[0].open();
  const closed2 = new Promise((r) => sb2.on('close', r));
  sb2.close();
  assert.equal(FakeWS.all[0].closedWith.code, 1000);
  assert.equal((await closed2).willReconnect, false);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(FakeWS.all.length, 1);
  void sb;
});

test('a missing pong declares a half-open connection dead and reconnects', async () => {
  FakeWS.all = [];
  const sb = new Switchboard('ws://x/ws', {
    user: 'h', WebSocket: FakeWS, heartbeatMs: 10, heartbeatTimeoutMs: 15, backoffBaseMs: 1, backoffCapMs: 2, logger: quiet,
  });
  const ws = FakeWS.all[0];
  ws.open();
  ws.recv({ op: 'welcome', user: 'h', conn: 'c', ping_interval_ms: 1 });
  const ev = await new Promise((r) => sb.on('close', r));
  assert.equal(ev.code, 4000);
  assert.ok(ws.sent.some((m) => m.op === 'ping'), 'pinged first');
  await new Promise((r) => setTimeout(r, 30));
  assert.ok(FakeWS.all.length >= 2, 'reconnected after declaring it dead');
  sb.close();
});

test('falls back to EventSource when WebSocket keeps failing', async () => {
  FakeWS.all = [];
  const sources = [];
  class FakeES { constructor(url) { this.url = url; sources.push(this); } close() {} }
  const sb = new Switchboard('ws://x:1/ws', {
    user: 'old', WebSocket: FakeWS, EventSource: FakeES, backoffBaseMs: 1, backoffCapMs: 1, logger: quiet,
  });
  sb.channels.set('news', { joinLeave: false });
  for (let i = 0; i < 3; i++) {
    while (FakeWS.all.length <= i) await new Promise((r) => setTimeout(r, 2));
    FakeWS.all[i].drop(1006);
  }
  assert.equal(sources.length, 1);
  assert.match(sources[0].url, /^http:\/\/x:1\/events\?user=old&since=confirmed&channel=news$/, "resumes over SSE too");
  sources[0].onmessage({ data: JSON.stringify({ op: 'msg', from: 'server', channel: 'news', data: 1 }) });
  await assert.rejects(sb.send('x', 1), (e) => e.code === 'not_connected');
  sb.close();
});

/** A Storage-like map. */
class MemStorage {
  constructor() { this.m = new Map(); }
  getItem(k) { return this.m.has(k) ? this.m.get(k) : null; }
  setItem(k, v) { this.m.set(k, String(v)); }
  removeItem(k) { this.m.delete(k); }
}

test('inbox: resumes from the stored position, drops duplicates by offset, confirms', async () => {
  FakeWS.all = [];
  const storage = new MemStorage();
  const sb = new Switchboard('ws://x/ws', {
    user: 'bob', WebSocket: FakeWS, storage, backoffBaseMs: 1, backoffCapMs: 2, heartbeatMs: 60000,
    confirmDelayMs: 1, logger: quiet,
  });
  const got = [];
  sb.on('message', (m) => got.push(m.offset));
  let ws = FakeWS.all[0];
  assert.match(ws.url, /since=confirmed/, 'no position yet: the confirmed one');
  ws.open();
  ws.recv({ op: 'welcome', user: 'bob', inbox: { epoch: 'e1', offset: 2 } });
  ws.recv({ op: 'msg', from: 'a', to: 'bob', data: 1, stream: 'inbox', offset: 1, epoch: 'e1' });
  ws.recv({ op: 'msg', from: 'a', to: 'bob', data: 2, stream: 'inbox', offset: 2, epoch: 'e1' });
  ws.recv({ op: 'msg', from: 'a', to: 'bob', data: 2, stream: 'inbox', offset: 2, epoch: 'e1' });
  ws.recv({ op: 'msg', from: 'a', to: 'bob', data: 'q0' });
  assert.deepEqual(got, [1, 2, undefined], 'the redelivered 2 is dropped; qos 0 passes');
  assert.equal(sb.duplicates, 1);
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(ws.sent.at(-1), { op: 'ack', stream: 'inbox', offset: 2 }, 'confirmed what was shown');
  assert.equal(storage.getItem('switchboard:inbox:bob'), JSON.stringify({ epoch: 'e1', offset: 2 }));
  ws.drop(1006);
  await new Promise((r) => setTimeout(r, 20));
  ws = FakeWS.all[1];
  assert.match(ws.url, /since=e1%3A2/, 'reconnects from its position');
  // A new client on the same storage (a reloaded page) starts where the old one was.
  const again = new Switchboard('ws://x/ws', { user: 'bob', WebSocket: FakeWS, storage, logger: quiet });
  assert.match(FakeWS.all.at(-1).url, /since=e1%3A2/);
  again.close();
  // The store was wiped: the position is forgotten.
  ws.open();
  const resumes = [];
  sb.on('resume', (r) => resumes.push(r));
  ws.recv({ op: 'welcome', user: 'bob', inbox: { epoch: 'e2', offset: 0, recovered: false, reason: 'epoch_changed' } });
  assert.deepEqual(resumes, [{ recovered: false, reason: 'epoch_changed' }]);
  assert.equal(sb.position.since(), 'confirmed');
  sb.close();
});

test('qos-1 sends wait while disconnected and retry with the same id until acknowledged', async () => {
  FakeWS.all = [];
  const sb = new Switchboard('ws://x/ws', {
    user: 'alice', WebSocket: FakeWS, storage: null, backoffBaseMs: 1, backoffCapMs: 2,
    heartbeatMs: 60000, logger: quiet,
  });
  let ws = FakeWS.all[0];
  const sending = sb.send('bob', { text: 'hi' }, { qos: 1 });
  assert.equal(ws.sent.length, 0, 'not connected yet: waits');
  ws.open();
  ws.recv({ op: 'welcome', user: 'alice' });
  const first = ws.sent.find((m) => m.op === 'send');
  assert.equal(first.qos, 1);
  ws.drop(1006); // lost before the ack
  await new Promise((r) => setTimeout(r, 20));
  ws = FakeWS.all[1];
  ws.open();
  ws.recv({ op: 'welcome', user: 'alice' });
  const retry = ws.sent.find((m) => m.op === 'send');
  assert.equal(retry.id, first.id, 'the same id: the server stores it once');
  ws.recv({ op: 'ack', id: first.id, stream: 'inbox', offset: 7, epoch: 'e', queued: true });
  const ack = await sending;
  assert.equal(ack.offset, 7);
  const failing = sb.send('bob', 1, { qos: 1 });
  const id = ws.sent.at(-1).id;
  ws.recv({ op: 'error', id, code: 'store_full', message: 'full' });
  await assert.rejects(failing, (e) => e.code === 'store_full');
  sb.close();
});

test('with several URLs the client moves to the next one after every close', async () => {
  FakeWS.all = [];
  const sb = new Switchboard(['ws://n1:8081/ws', 'ws://n2:8082/ws'], {
    user: 'alice', WebSocket: FakeWS, backoffBaseMs: 1, backoffCapMs: 2, heartbeatMs: 60000,
    logger: quiet, storage: null,
  });
  assert.match(FakeWS.all[0].url, /^ws:\/\/n1:8081\/ws\?/);
  FakeWS.all[0].open();
  let next = new Promise((r) => sb.on('reconnecting', r));
  FakeWS.all[0].drop(1001, 'node shutting down; reconnect to another node');
  await next;
  await new Promise((r) => setTimeout(r, 10));
  assert.match(FakeWS.all[1].url, /^ws:\/\/n2:8082\/ws\?/, 'the other node');
  next = new Promise((r) => sb.on('reconnecting', r));
  FakeWS.all[1].drop(1006);
  await next;
  await new Promise((r) => setTimeout(r, 10));
  assert.match(FakeWS.all[2].url, /^ws:\/\/n1:8081\/ws\?/, 'and back in turn');
  sb.close();
  assert.throws(() => new Switchboard([], { WebSocket: FakeWS, autoConnect: false }), /no URL/);
});

test('a busy server\'s 1013 with retry_after_ms delays the reconnect at least that long', async () => {
  FakeWS.all = [];
  const sb = new Switchboard('ws://x/ws', {
    user: 'storm', WebSocket: FakeWS, backoffBaseMs: 1, backoffCapMs: 2, heartbeatMs: 60000, logger: quiet,
  });
  const ws = FakeWS.all[0];
  ws.open();
  const reconnecting = new Promise((r) => sb.on('reconnecting', r));
  ws.drop(1013, 'server busy, try again later; retry_after_ms=4321');
  const ev = await reconnecting;
  assert.equal(ev.code, 1013);
  assert.ok(ev.delayMs >= 4321, `waited ${ev.delayMs} ms`);
  sb.close();
});

test('no EventSource fallback once WebSocket has worked on the page: a restart is not a proxy', async () => {
  FakeWS.all = [];
  const sources = [];
  class FakeES { constructor(url) { this.url = url; sources.push(this); } close() {} }
  const sb = new Switchboard('ws://x:1/ws', {
    user: 'chat', WebSocket: FakeWS, EventSource: FakeES, backoffBaseMs: 1, backoffCapMs: 1, logger: quiet,
  });
  FakeWS.all[0].open();
  FakeWS.all[0].drop(1001, 'server shutting down');
  for (let i = 1; i <= 5; i++) {
    for (let n = 0; n < 500 && FakeWS.all.length <= i && sources.length === 0; n++) {
      await new Promise((r) => setTimeout(r, 2));
    }
    if (i < 5 && FakeWS.all[i]) FakeWS.all[i].drop(1006);
  }
  assert.equal(sources.length, 0, 'no fallback to EventSource');
  assert.equal(FakeWS.all.length, 6, 'still trying WebSocket');
  sb.close();
});

test('calls made before the connection opens wait in a bounded queue and go out once open (README snippet)', async () => {
  FakeWS.all = [];
  const sb = new Switchboard('ws://x/ws', {
    user: 'alice', WebSocket: FakeWS, storage: null, backoffBaseMs: 1, backoffCapMs: 2,
    heartbeatMs: 60000, logger: quiet, maxQueued: 2, queueTimeoutMs: 50,
  });
  const ws = FakeWS.all[0];
  // As the README has it: subscribe, send and publish right after `new Switchboard`.
  const sub = sb.subscribe('room1');
  const sent = sb.send('bob', { text: 'hi' });
  const pub = sb.publish('room1', 'hello room');
  await assert.rejects(sb.presence('room1'), (e) => e.code === 'queue_full', 'over maxQueued: refused at once');
  assert.equal(ws.sent.length, 0, 'nothing goes out before the welcome');
  ws.open();
  ws.recv({ op: 'welcome', user: 'alice' });
  assert.deepEqual(ws.sent.map((m) => m.op), ['sub', 'send', 'pub'], 'once, in the order made');
  for (const m of ws.sent) ws.recv({ op: 'ack', id: m.id });
  await sub;
  await sent;
  await pub;
  // A call that waits longer than queueTimeoutMs rejects with `timeout`.
  ws.drop(1006);
  const late = sb.send('bob', 2);
  await assert.rejects(late, (e) => e.code === 'timeout');
  // close() rejects whatever still waits.
  const waiting = sb.publish('room1', 3);
  sb.close();
  await assert.rejects(waiting, (e) => e.code === 'closed');
});

test('a receipt names our qos-1 ids, comes as a receipt event and is confirmed like any inbox event', async () => {
  FakeWS.all = [];
  const sb = new Switchboard('ws://x/ws', {
    user: 'alice', WebSocket: FakeWS, storage: null, backoffBaseMs: 1, backoffCapMs: 2,
    heartbeatMs: 60000, logger: quiet, confirmDelayMs: 1,
  });
  const ws = FakeWS.all[0];
  ws.open();
  ws.recv({ op: 'welcome', user: 'alice', inbox: { epoch: 'e', offset: 0 } });
  const sending = sb.send('bob', { text: 'hi' }, { qos: 1 });
  assert.equal(sending.id, ws.sent.at(-1).id, 'the promise carries the id a receipt names');
  ws.recv({ op: 'ack', id: sending.id, stream: 'inbox', offset: 1, epoch: 'e', queued: false });
  await sending;
  const receipts = [];
  const messages = [];
  sb.on('receipt', (r) => receipts.push(r));
  sb.on('message', (m) => messages.push(m));
  ws.recv({ op: 'receipt', from: 'bob', to: 'alice', ids: [sending.id], upto: 4, stream: 'inbox', offset: 2, epoch: 'e' });
  ws.recv({ op: 'receipt', from: 'bob', to: 'alice', ids: [sending.id], upto: 4, stream: 'inbox', offset: 2, epoch: 'e' });
  assert.deepEqual(receipts.map((r) => r.ids), [[sending.id]], 'a redelivered receipt is dropped by offset');
  assert.equal(messages.length, 0, 'not a message');
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(ws.sent.at(-1), { op: 'ack', stream: 'inbox', offset: 2 });
  sb.close();
});
