// Drives two headless Chromium pages through an exchange of messages on the chat page
// that `switchboard standalone` serves, against a real standalone process.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';
import { chromium } from 'playwright-core';

const BIN = process.env.SWITCHBOARD_BIN;
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function waitReady(url, child, deadlineMs) {
  const start = Date.now();
  while (Date.now() - start < deadlineMs) {
    if (child.exitCode !== null) throw new Error(`switchboard exited with ${child.exitCode}`);
    try {
      const res = await fetch(url);
      if (res.ok) return;
    } catch { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${url} not ready after ${deadlineMs} ms`);
}

let child;
let dataDir;
let baseUrl;
let browser;
let logs = '';

before(async () => {
  assert.ok(BIN, 'SWITCHBOARD_BIN must point at the switchboard binary');
  dataDir = mkdtempSync(join(tmpdir(), 'switchboard-browser-'));
  const ports = {};
  for (const k of ['listen', 'ggrpc', 'gadmin', 'pgrpc', 'padmin', 'rgrpc', 'radmin', 'sgrpc', 'sadmin']) {
    ports[k] = await freePort();
  }
  const inherited = { ...process.env };
  delete inherited.SWITCHBOARD_BIN;
  const env = {
    ...inherited,
    SWITCHBOARD_DATA_DIR: dataDir,
    SWITCHBOARD_GATEWAY__LISTEN: `127.0.0.1:${ports.listen}`,
    SWITCHBOARD_GATEWAY__GRPC_LISTEN: `127.0.0.1:${ports.ggrpc}`,
    SWITCHBOARD_GATEWAY__ADMIN_LISTEN: `127.0.0.1:${ports.gadmin}`,
    SWITCHBOARD_PRESENCE__GRPC_LISTEN: `127.0.0.1:${ports.pgrpc}`,
    SWITCHBOARD_PRESENCE__ADMIN_LISTEN: `127.0.0.1:${ports.padmin}`,
    SWITCHBOARD_ROUTING__GRPC_LISTEN: `127.0.0.1:${ports.rgrpc}`,
    SWITCHBOARD_ROUTING__ADMIN_LISTEN: `127.0.0.1:${ports.radmin}`,
    SWITCHBOARD_STORAGE__GRPC_LISTEN: `127.0.0.1:${ports.sgrpc}`,
    SWITCHBOARD_STORAGE__ADMIN_LISTEN: `127.0.0.1:${ports.sadmin}`,
    SWITCHBOARD_CLUSTER__PRESENCE_URL: `http://127.0.0.1:${ports.pgrpc}`,
    SWITCHBOARD_CLUSTER__ROUTING_URL: `http://127.0.0.1:${ports.rgrpc}`,
    SWITCHBOARD_CLUSTER__STORAGE_URL: `http://127.0.0.1:${ports.sgrpc}`,
    // Short, so the test sees typing expire; repeats are not throttled.
    SWITCHBOARD_GATEWAY__TYPING_EXPIRY_MS: '1500',
    SWITCHBOARD_GATEWAY__TYPING_INTERVAL_MS: '100',
  };
  child = spawn(BIN, ['standalone'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.on('data', (d) => { logs += d; });
  child.stderr.on('data', (d) => { logs += d; });
  baseUrl = `http://127.0.0.1:${ports.listen}`;
  try {
    await waitReady(`${baseUrl}/readyz`, child, 30000);
  } catch (e) {
    throw new Error(`${e.message}\n${logs.slice(-4000)}`);
  }
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (child && child.exitCode === null) {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
  }
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

async function login(name, peer) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (e) => { logs += `\n[${name} page error] ${e}`; });
  await page.goto(`${baseUrl}/`);
  await page.fill('#user', name);
  await page.click('#login');
  await page.fill('#peer', peer);
  await page.click('#open');
  return page;
}

async function sendText(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
}

test('two users chat through the standalone chat page', async (t) => {
  try {
    const alice = await login('alice', 'bob');
    const bob = await login('bob', 'alice');

    // Each sees the other online.
    await alice.locator('#peer-presence').filter({ hasText: 'online' }).waitFor({ timeout: 15000 });
    await bob.locator('#peer-presence').filter({ hasText: 'online' }).waitFor({ timeout: 15000 });

    await sendText(alice, 'hello bob');
    await bob.locator('#messages').filter({ hasText: 'hello bob' }).waitFor({ timeout: 15000 });
    await sendText(bob, 'hi alice');
    await alice.locator('#messages').filter({ hasText: 'hi alice' }).waitFor({ timeout: 15000 });

    // Order is the same on both pages: alice's message, then bob's.
    for (const page of [alice, bob]) {
      const text = await page.locator('#messages').innerText();
      assert.ok(text.indexOf('hello bob') < text.indexOf('hi alice'), text);
    }

    // Typing shows at the peer and clears: when the typer sends, and when it expires
    // without another typing event.
    const typing = () => bob.locator('#peer-typing').filter({ hasText: 'typing...' });
    const notTyping = async () => {
      await bob.waitForFunction(() => document.getElementById('peer-typing').textContent === '', null, { timeout: 15000 });
    };
    await alice.type('#text', 'ab');
    await typing().waitFor({ timeout: 15000 });
    await alice.click('#send');
    await notTyping();
    await bob.locator('#messages').filter({ hasText: 'ab' }).waitFor({ timeout: 15000 });
    await alice.type('#text', 'c');
    await typing().waitFor({ timeout: 15000 });
    await notTyping(); // expires_in_ms (1.5 s) later, nothing else sent
    await alice.fill('#text', '');

    // A page opened later shows the history of the conversation.
    const bob2 = await login('bob', 'alice');
    await bob2.locator('#messages').filter({ hasText: 'hi alice' }).waitFor({ timeout: 15000 });
    const text = await bob2.locator('#messages').innerText();
    assert.ok(text.includes('hello bob'), text);

    // When alice leaves, bob sees her offline.
    await alice.context().close();
    await bob.locator('#peer-presence').filter({ hasText: 'offline' }).waitFor({ timeout: 15000 });
  } catch (e) {
    t.diagnostic(`switchboard output:\n${logs.slice(-4000)}`);
    throw e;
  }
});
