// End to end in real headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core):
// two people chat through the page served by the real switchboard binary, join a room, live
// through a server restart, and chat again. Screenshots go to target/e2e/.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.SWITCHBOARD_BIN || `${root}/target/release/switchboard`;
const OUT = `${root}/target/e2e`;
const WAIT = { timeout: 15000 };
mkdirSync(OUT, { recursive: true });

function startServer(listen, store = ['--store', 'memory']) {
  return new Promise((resolveStart, reject) => {
    const child = spawn(BIN, ['--listen', listen, '--shards', '2', '--max-connections', '10000', '--shutdown-grace-ms', '2000', ...store], {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...process.env, RUST_LOG: 'warn' },
    });
    let buf = '';
    const timer = setTimeout(() => reject(new Error('server did not start')), 15000);
    child.stdout.on('data', (d) => {
      buf += d;
      const m = buf.match(/listening on (\S+)/);
      if (m) {
        clearTimeout(timer);
        resolveStart({ child, addr: m[1] });
      }
    });
    child.on('exit', (code) => reject(new Error(`server exited ${code}`)));
  });
}

function stopServer(child) {
  return new Promise((r) => {
    child.on('exit', (code, signal) => r({ code, signal }));
    child.kill('SIGTERM');
  });
}

let browser;
let server;
let server2;
after(async () => {
  await browser?.close();
  server?.child.kill('SIGKILL');
  server2?.child.kill('SIGKILL');
});

function launch(extraArgs = []) {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync', ...extraArgs],
  });
}

async function login(page, base, name) {
  await page.goto(`${base}/`);
  await page.fill('#name', name);
  await page.click('#connect');
  await page.waitForFunction((n) => document.getElementById('state').textContent === `connected as ${n}`, name, WAIT);
}

async function sendText(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
}

async function subscribers(base, channel) {
  const r = await fetch(`${base}/api/channels/${channel}`);
  return (await r.json()).subscribers;
}

async function until(what, f) {
  const end = Date.now() + WAIT.timeout;
  while (!(await f())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('two people chat in real Chromium, through a server restart', async () => {
  server = await startServer('127.0.0.1:0');
  const base = `http://${server.addr}`;
  browser = await launch();
  const alice = await (await browser.newContext({ viewport: { width: 900, height: 700 } })).newPage();
  const bob = await (await browser.newContext({ viewport: { width: 390, height: 780 } })).newPage();
  const consoleLines = { alice: [], bob: [] };
  alice.on('console', (m) => consoleLines.alice.push(m.text()));
  bob.on('console', (m) => consoleLines.bob.push(m.text()));

  await login(alice, base, 'alice');
  await login(bob, base, 'bob');

  // Alice picks Bob from the online list and sends a message; it turns delivered.
  await alice.click('#people button[data-user="bob"]', WAIT);
  await sendText(alice, 'hi bob');
  await alice.waitForSelector('#messages li.mine .status[data-status="delivered"]', WAIT);
  // Bob sees it, replies; Alice sees the reply.
  await bob.click('#people button[data-user="alice"]', WAIT);
  await bob.waitForSelector('#messages li:has-text("hi bob")', WAIT);
  await sendText(bob, 'hi alice');
  await bob.waitForSelector('#messages li.mine:has-text("hi alice") .status[data-status="delivered"]', WAIT);
  await alice.waitForSelector('#messages li:not(.mine):has-text("hi alice")', WAIT);

  // Both join a room and see each other's messages.
  await alice.click('#join');
  await bob.click('#join');
  await until('both in room1', async () => (await subscribers(base, 'room1')) === 2);
  await sendText(alice, 'hello room');
  await sendText(bob, 'hello from bob');
  for (const page of [alice, bob]) {
    await page.waitForSelector('#messages li:has-text("hello room")', WAIT);
    await page.waitForSelector('#messages li:has-text("hello from bob")', WAIT);
  }

  // README's snippet, as written (calls made right after `new Switchboard` wait for the
  // connection): carol says hi to bob and to the room.
  const snippet = await alice.evaluate(async () => {
    const { Switchboard } = await import('/client.js');
    const sb = new Switchboard(`ws://${location.host}/ws`, { user: 'carol' });
    await sb.subscribe('room1');
    const sent = await sb.send('bob', { text: 'hi' });
    const published = await sb.publish('room1', 'hello room');
    sb.close();
    return { sent: sent.op, published: published.op };
  });
  assert.deepEqual(snippet, { sent: 'ack', published: 'ack' });
  // bob's page got carol's DM (she appears among his conversations).
  await bob.waitForSelector('#people button[data-user="carol"]', WAIT);

  // The server stops: both pages explain the close; it starts again: both reconnect.
  const stopped = await stopServer(server.child);
  assert.equal(stopped.code, 0, 'server exits 0 on SIGTERM');
  // Each page shows the 1001 first; a failed reconnect attempt may replace it (1006) at once,
  // so the text is read in the same poll that saw the 1001.
  const explanations = [];
  for (const page of [alice, bob]) {
    const seen = await page.waitForFunction(() => {
      const text = document.getElementById('close-explanation').textContent;
      return /Closed 1001/.test(text) && text;
    }, null, WAIT);
    explanations.push(await seen.jsonValue());
  }
  for (const explanation of explanations) assert.match(explanation, /shutting down/);
  // Failed reconnect attempts (the server is down) keep the server's reason on screen.
  const retrying = await alice.waitForFunction(() => {
    const text = document.getElementById('close-explanation').textContent;
    return /attempt \d+/.test(text) && text;
  }, null, WAIT);
  assert.match(await retrying.jsonValue(), /^Closed 1001 \(server shutting down; retry_after_ms=\d+\)/);
  await alice.screenshot({ path: `${OUT}/alice-server-down.png` });
  server = await startServer(server.addr);
  for (const [page, name] of [[alice, 'alice'], [bob, 'bob']]) {
    await page.waitForFunction((n) => document.getElementById('state').textContent === `connected as ${n}`, name, WAIT);
    await page.waitForFunction(() => /Reconnected/.test(document.getElementById('close-explanation').textContent), null, WAIT);
  }
  assert.ok(consoleLines.alice.some((l) => l.includes('code=1001') && l.includes('shutting down')), 'close logged to the console');

  // Messaging works again, in the room (restored subscription) and directly.
  await until('room1 restored', async () => (await subscribers(base, 'room1')) === 2);
  await sendText(bob, 'back in the room');
  await alice.waitForSelector('#messages li:has-text("back in the room")', WAIT);
  await alice.click('#people button[data-user="bob"]', WAIT);
  await sendText(alice, 'still there?');
  await alice.waitForSelector('#messages li.mine:has-text("still there?") .status[data-status="delivered"]', WAIT);
  await bob.click('#people button[data-user="alice"]', WAIT);
  await bob.waitForSelector('#messages li:has-text("still there?")', WAIT);

  await alice.screenshot({ path: `${OUT}/alice.png`, fullPage: true });
  await bob.screenshot({ path: `${OUT}/bob.png`, fullPage: true });
});

test('messages sent while a tab was closed arrive in order through a kill -9, and turn received', async () => {
  const dataDir = `${OUT}/data-${process.pid}`;
  rmSync(dataDir, { recursive: true, force: true });
  const store = ['--store', 'redb', '--data-dir', dataDir];
  server2 = await startServer('127.0.0.1:0', store);
  const base = `http://${server2.addr}`;
  browser ||= await launch();
  const alice = await (await browser.newContext()).newPage();
  const bobContext = await browser.newContext(); // keeps bob's localStorage across tabs
  let bob = await bobContext.newPage();
  await login(alice, base, 'alice');
  await login(bob, base, 'bob');
  await alice.click('#people button[data-user="bob"]', WAIT);
  await sendText(alice, 'before you left');
  await bob.click('#people button[data-user="alice"]', WAIT);
  await bob.waitForSelector('#messages li:has-text("before you left")', WAIT);
  // Bob closes his tab; Alice sends three messages: stored, waiting for him.
  await bob.close();
  for (const text of ['one', 'two', 'three']) {
    await sendText(alice, text);
    await alice.waitForSelector(`#messages li.mine:has-text("${text}") .status[data-status="queued"]`, WAIT);
  }
  // The server is killed in the middle of the conversation (what was acked is on disk).
  const killed = new Promise((r) => server2.child.on('exit', (code, signal) => r(signal)));
  server2.child.kill('SIGKILL');
  assert.equal(await killed, 'SIGKILL');
  server2 = await startServer(server2.addr, store);
  await alice.waitForFunction(() => document.getElementById('state').textContent === 'connected as alice', null, WAIT);
  // Bob opens the page again: the three arrive, in order, once.
  bob = await bobContext.newPage();
  await login(bob, base, 'bob');
  await bob.click('#people button[data-user="alice"]', WAIT);
  await bob.waitForSelector('#messages li:has-text("three")', WAIT);
  const texts = await bob.$$eval('#messages li .text', (els) => els.map((e) => e.textContent));
  assert.deepEqual(texts.filter((t) => ['one', 'two', 'three'].includes(t)), ['one', 'two', 'three']);
  assert.ok(!texts.includes('before you left'), 'what bob had seen is not replayed');
  // Bob's page confirms what it showed; alice's page learns it from the receipt: every
  // message she sent moves from "✓ stored" (or "✓ delivered") to "✓✓ received".
  for (const text of ['before you left', 'one', 'two', 'three']) {
    await alice.waitForSelector(`#messages li.mine:has-text("${text}") .status[data-status="received"]`, WAIT);
  }
  assert.equal(await alice.textContent('#messages li.mine:has-text("three") .status'), '✓✓ received');
  // Her own copies, replayed when she resumed after the kill, are not shown twice.
  const mine = await alice.$$eval('#messages li.mine .text', (els) => els.map((e) => e.textContent));
  assert.deepEqual(mine, ['before you left', 'one', 'two', 'three']);
  await alice.screenshot({ path: `${OUT}/alice-received.png`, fullPage: true });
  await bob.screenshot({ path: `${OUT}/bob-after-reopen.png`, fullPage: true });
  await stopServer(server2.child);
  server2 = null;
  rmSync(dataDir, { recursive: true, force: true });
});

test('a plain EventSource resumes by itself: messages stored while it was away arrive once, in order', async () => {
  const es = await startServer('127.0.0.1:0');
  try {
    const base = `http://${es.addr}`;
    browser ||= await launch();
    const page = await (await browser.newContext()).newPage();
    await page.goto(`${base}/`);
    // No `since`, no client library: what an old browser or a dashboard does.
    await page.evaluate(() => {
      window.got = [];
      window.opens = 0;
      const s = new EventSource('/events?user=dave');
      s.onopen = () => { window.opens += 1; };
      s.onmessage = (e) => window.got.push(JSON.parse(e.data).data);
    });
    const send = async (data) => {
      const r = await fetch(`${base}/api/send`, { method: 'POST', body: JSON.stringify({ to: 'dave', data, qos: 1 }) });
      assert.equal(r.status, 200, await r.text());
    };
    await page.waitForFunction(() => window.opens === 1, null, WAIT);
    await until('dave online', async () => (await (await fetch(`${base}/api/users/dave`)).json()).online);
    await send(1);
    await page.waitForFunction(() => window.got.length === 1, null, WAIT);
    // The server ends the stream; while the browser waits to reconnect (retry: 2000), two
    // more are stored for dave. The browser comes back with Last-Event-ID on its own.
    const r = await fetch(`${base}/api/disconnect`, { method: 'POST', body: JSON.stringify({ user: 'dave', code: 4000, reason: 'test' }) });
    assert.equal(r.status, 200);
    await until('dave offline', async () => !(await (await fetch(`${base}/api/users/dave`)).json()).online);
    await send(2);
    await send(3);
    await page.waitForFunction(() => window.opens === 2 && window.got.length >= 3, null, WAIT);
    await send(4);
    await page.waitForFunction(() => window.got.length >= 4, null, WAIT);
    assert.deepEqual(await page.evaluate(() => window.got), [1, 2, 3, 4]);
  } finally {
    es.child.kill('SIGKILL');
  }
});

// A free loopback port (closed again before use).
async function freePort() {
  const net = await import('node:net');
  return new Promise((r) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => r(port));
    });
  });
}

// A redis-server (Debian's; .ci/run installs it) on a free port, no persistence; answers PING.
async function startRedis() {
  const net = await import('node:net');
  const port = await freePort();
  const dir = `${OUT}/redis-${process.pid}`;
  mkdirSync(dir, { recursive: true });
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '',
    '--appendonly', 'no', '--dir', dir], { stdio: 'ignore' });
  const ping = () => new Promise((r) => {
    const s = net.connect(port, '127.0.0.1', () => s.write('PING\r\n'));
    s.on('data', (d) => { s.destroy(); r(String(d).startsWith('+PONG')); });
    s.on('error', () => r(false));
  });
  await until('redis-server to answer', ping);
  return { child, port, dir };
}

test('two people on two nodes of a cluster chat, and a message waits in Redis for a closed tab', async () => {
  const redis = await startRedis();
  const broker = ['--broker', `redis://127.0.0.1:${redis.port}`];
  const n1 = await startServer('127.0.0.1:0', [...broker, '--node-id', 'n1']);
  const n2 = await startServer('127.0.0.1:0', [...broker, '--node-id', 'n2']);
  try {
    browser ||= await launch();
    const alice = await (await browser.newContext()).newPage();
    const bobContext = await browser.newContext();
    let bob = await bobContext.newPage();
    await login(alice, `http://${n1.addr}`, 'alice');
    await login(bob, `http://${n2.addr}`, 'bob');
    // Each sees the other (lobby announcements cross nodes) and they talk across nodes.
    await alice.click('#people button[data-user="bob"]', WAIT);
    await sendText(alice, 'hi from node 1');
    await alice.waitForSelector('#messages li.mine .status[data-status="delivered"]', WAIT);
    await bob.click('#people button[data-user="alice"]', WAIT);
    await bob.waitForSelector('#messages li:has-text("hi from node 1")', WAIT);
    await sendText(bob, 'hi from node 2');
    await alice.waitForSelector('#messages li:not(.mine):has-text("hi from node 2")', WAIT);
    // Bob closes his tab; alice's messages (sent on node 1) wait in his inbox in Redis; bob
    // comes back on node 2 and gets them in order.
    await bob.close();
    for (const text of ['one', 'two', 'three']) {
      await sendText(alice, text);
      await alice.waitForSelector(`#messages li.mine:has-text("${text}") .status[data-status="queued"]`, WAIT);
    }
    bob = await bobContext.newPage();
    await login(bob, `http://${n2.addr}`, 'bob');
    await bob.click('#people button[data-user="alice"]', WAIT);
    await bob.waitForSelector('#messages li:has-text("three")', WAIT);
    const texts = await bob.$$eval('#messages li .text', (els) => els.map((e) => e.textContent));
    assert.deepEqual(texts.filter((t) => ['one', 'two', 'three'].includes(t)), ['one', 'two', 'three']);
    await bob.screenshot({ path: `${OUT}/bob-other-node.png`, fullPage: true });
  } finally {
    n1.child.kill('SIGKILL');
    n2.child.kill('SIGKILL');
    redis.child.kill('SIGKILL');
    rmSync(redis.dir, { recursive: true, force: true });
  }
});

test('two people chat over wss:// and the page loads over https://', async () => {
  // A self-signed P-256 certificate for this run; Chromium is told to accept it.
  const dir = `${OUT}/tls-${process.pid}`;
  mkdirSync(dir, { recursive: true });
  const made = spawnSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-days', '2', '-keyout', `${dir}/key.pem`, '-out', `${dir}/cert.pem`, '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'], { stdio: 'ignore' });
  assert.equal(made.status, 0, 'openssl made a certificate');
  const tls = await startServer('127.0.0.1:0', ['--store', 'memory', '--tls-cert', `${dir}/cert.pem`, '--tls-key', `${dir}/key.pem`]);
  const insecure = await launch(['--ignore-certificate-errors']);
  try {
    const base = `https://${tls.addr}`;
    const alice = await (await insecure.newContext()).newPage();
    const bob = await (await insecure.newContext()).newPage();
    await login(alice, base, 'alice');
    await login(bob, base, 'bob');
    // The page chose wss:// by itself.
    assert.equal(await alice.evaluate(() => location.protocol), 'https:');
    await alice.click('#people button[data-user="bob"]', WAIT);
    await sendText(alice, 'over tls');
    await alice.waitForSelector('#messages li.mine .status[data-status="delivered"]', WAIT);
    await bob.click('#people button[data-user="alice"]', WAIT);
    await bob.waitForSelector('#messages li:has-text("over tls")', WAIT);
    await sendText(bob, 'and back');
    await alice.waitForSelector('#messages li:not(.mine):has-text("and back")', WAIT);
    await alice.screenshot({ path: `${OUT}/alice-wss.png`, fullPage: true });
  } finally {
    await insecure.close();
    await stopServer(tls.child);
    rmSync(dir, { recursive: true, force: true });
  }
});
