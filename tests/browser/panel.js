#!/usr/bin/env node
// Drives the Orchestra side panel in JupyterLab (or Notebook 7) with Debian's headless chromium:
// runs the notebook's cells one by one, opens the panel, watches a background job's count rise,
// cancels it and resizes the pool from the panel, and counts the panel comm's websocket frames
// while 10 jobs run. Prints one JSON result line on stdout (exit 0 ok, 1 failed, 2 bad config).
//
// Usage: node panel.js CONFIG   (a JSON string or file) with keys url, token, notebook (relative to
// the server root), ui ('lab' or 'notebook'), screenshot, docs_screenshot (optional), chromium.
// The notebook's cells: 0 set-up (%load_ext, pool ready), 1 a background map `bg`,
// 2 ten background maps `jobs`, 3 `bg` and `jobs` final state printed as JSON.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const TIMEOUT = 60000;

function loadConfig(arg) {
  if (!arg) throw new Error('usage: node panel.js CONFIG_JSON_OR_FILE');
  const cfg = {
    ui: 'lab', chromium: '/usr/bin/chromium', viewport: { width: 1400, height: 900 }, screenshot: null,
    docs_screenshot: null,
    ...JSON.parse(arg.trim().startsWith('{') ? arg : fs.readFileSync(arg, 'utf8')),
  };
  for (const key of ['url', 'token', 'notebook']) if (!cfg[key]) throw new Error(`config: "${key}" is required`);
  if (!['lab', 'notebook'].includes(cfg.ui)) throw new Error(`config: ui must be "lab" or "notebook", got ${cfg.ui}`);
  return cfg;
}

async function waitForKernel(cfg) {
  const url = `${cfg.url.replace(/\/$/, '')}/api/sessions`;
  const deadline = Date.now() + TIMEOUT;
  let last = 'no session yet';
  while (Date.now() < deadline) {
    try {
      const res = await fetch(url, { headers: { Authorization: `token ${cfg.token}` } });
      const session = (await res.json()).find((s) => s.path === cfg.notebook);
      if (session && session.kernel) {
        const { execution_state: state, connections } = session.kernel;
        if (state === 'idle' && connections > 0) return;
        last = `kernel ${state}, ${connections} connection(s)`;
      }
    } catch (e) {
      last = e.message;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`kernel for ${cfg.notebook} not idle and connected in time (${last})`);
}

async function main() {
  let cfg;
  try {
    cfg = loadConfig(process.argv[2]);
  } catch (e) {
    console.error(`panel.js: ${e.message}`);
    return 2;
  }
  const t0 = Date.now();
  const result = {
    ok: false, phase: 'launch', message: '', ui: cfg.ui, counts_seen: [], cancelled_status: null, cell_label: null,
    workers_before: null, workers_after: null, rate: null, frames: 0, window_s: null, jobs_seen: 0,
    final: null, console_errors: [], screenshot: cfg.screenshot, elapsed_s: 0,
  };
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'orchestra-chromium-'));
  let ctx = null;
  let page = null;
  // Websocket frames that carry the panel's comm id, with the time they passed (both directions).
  const frames = [];
  let commId = null;
  const watchFrame = (payload) => {
    if (commId === null) return;
    const text = typeof payload === 'string' ? payload : Buffer.from(payload).toString('latin1');
    if (text.includes(commId)) frames.push(Date.now());
  };
  try {
    ctx = await chromium.launchPersistentContext(profile, {
      executablePath: cfg.chromium, headless: true, viewport: cfg.viewport,
      args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
        '--disable-sync', '--no-first-run'],
    });
    page = ctx.pages()[0] || (await ctx.newPage());
    const consoleError = (text) => { if (result.console_errors.length < 20) result.console_errors.push(text.slice(0, 500)); };
    page.on('pageerror', (err) => consoleError(String(err)));
    page.on('console', (msg) => { if (msg.type() === 'error') consoleError(msg.text()); });
    page.on('websocket', (ws) => {
      if (!ws.url().includes('/channels')) return;
      ws.on('framereceived', (f) => watchFrame(f.payload));
      ws.on('framesent', (f) => watchFrame(f.payload));
    });

    result.phase = 'open';
    const base = cfg.url.replace(/\/$/, '');
    const nb = cfg.notebook.split('/').map(encodeURIComponent).join('/');
    const token = encodeURIComponent(cfg.token);
    const address = cfg.ui === 'lab' ? `${base}/lab/tree/${nb}?reset&token=${token}` : `${base}/notebooks/${nb}?token=${token}`;
    await page.goto(address, { timeout: TIMEOUT });
    result.phase = 'kernel';
    await waitForKernel(cfg);
    const NB = cfg.ui === 'lab' ? '.jp-NotebookPanel:not(.lm-mod-hidden)' : '.jp-NotebookPanel';
    await page.waitForSelector(`${NB} .jp-Notebook-ExecutionIndicator[data-status="idle"]`, { timeout: TIMEOUT })
      .catch(() => {}); // Notebook 7 has no such indicator in every layout: the session check above is the gate
    const cell = (i) => page.locator(`${NB} .jp-Notebook .jp-Cell`).nth(i);
    const runCell = async (i) => {
      await cell(i).locator('.jp-InputArea-editor').click();
      await page.keyboard.press('Shift+Enter');
      await page.waitForFunction(([sel, i]) => {
        const prompt = document.querySelectorAll(sel)[i]?.querySelector('.jp-InputPrompt');
        return prompt && /\[\d+\]/.test(prompt.textContent);
      }, [`${NB} .jp-Notebook .jp-Cell`, i], { timeout: TIMEOUT, polling: 50 });
    };

    result.phase = 'open-panel';
    if (cfg.ui === 'lab') {
      await page.locator('.jp-SideBar.jp-mod-right .lm-TabBar-tab[data-id="orchestra-nb-panel"]').click();
    } else {
      // Notebook 7: View > Right Sidebar > the panel's entry (its caption)
      await page.locator('.lm-MenuBar-item', { hasText: /^View$/ }).click();
      await page.locator('.lm-Menu-item', { hasText: /Right Sidebar/ }).first().hover();
      await page.locator('.lm-Menu-item', { hasText: /Orchestra/ }).first().click();
    }
    const panel = page.locator('#orchestra-nb-panel');
    await panel.waitFor({ state: 'visible', timeout: TIMEOUT });
    if (cfg.ui === 'lab') {
      // widen the right sidebar (drag its split handle) so the screenshots show every column
      const handle = page.locator('#jp-main-split-panel > .lm-SplitPanel-handle:not(.lm-mod-hidden)').last();
      const box = await handle.boundingBox().catch(() => null);
      if (box) {
        const y = box.y + box.height / 2;
        await page.mouse.move(box.x + box.width / 2, y);
        await page.mouse.down();
        await page.mouse.move(box.x - 140, y, { steps: 5 });
        await page.mouse.up();
      }
    }

    result.phase = 'setup-cell';
    await runCell(0);
    await panel.locator('.orchestra-panel[data-connected="true"]').waitFor({ timeout: TIMEOUT });
    commId = await panel.getAttribute('data-comm-id');
    await page.waitForFunction(() => document.querySelectorAll('#orchestra-nb-panel .orchestra-worker').length > 0,
      null, { timeout: TIMEOUT, polling: 50 });
    result.workers_before = await panel.locator('.orchestra-worker').count();

    result.phase = 'background-map';
    await runCell(1);
    const job = panel.locator('.orchestra-job').first();
    await job.waitFor({ timeout: TIMEOUT });
    const count = job.locator('.orchestra-job-count');
    // the count rises: wait for three different values
    const deadline = Date.now() + TIMEOUT;
    while (result.counts_seen.length < 3) {
      const text = await count.textContent();
      if (text !== result.counts_seen[result.counts_seen.length - 1]) result.counts_seen.push(text);
      if (Date.now() > deadline) throw new Error(`the job's count did not rise: ${result.counts_seen}`);
      await page.waitForTimeout(50);
    }
    if (cfg.screenshot) await page.screenshot({ path: cfg.screenshot });

    result.phase = 'cancel';
    await job.locator('.orchestra-cancel').click();
    await page.waitForFunction(() => {
      const row = document.querySelector('#orchestra-nb-panel .orchestra-job');
      return row && row.dataset.status !== 'running';
    }, null, { timeout: TIMEOUT, polling: 50 });
    result.cancelled_status = await job.getAttribute('data-status');
    // the cell's own progress widget ends cancelled too
    await page.waitForFunction((sel) => {
      const label = document.querySelectorAll(sel)[1]?.querySelector('.widget-html-content');
      return label && /cancelled in/.test(label.textContent);
    }, `${NB} .jp-Notebook .jp-Cell`, { timeout: TIMEOUT, polling: 50 });
    result.cell_label = (await cell(1).locator('.widget-html-content').first().textContent()).trim();

    result.phase = 'resize';
    const target = result.workers_before + 1;
    await panel.locator('.orchestra-resize-input').fill(String(target));
    await panel.locator('.orchestra-resize-button').click();
    await page.waitForFunction((n) => {
      const rows = document.querySelectorAll('#orchestra-nb-panel .orchestra-worker');
      const ready = [...rows].filter((r) => ['idle', 'busy'].includes(r.dataset.activity));
      return ready.length === n;
    }, target, { timeout: TIMEOUT, polling: 50 });
    result.workers_after = await panel.locator('.orchestra-worker[data-activity="idle"], .orchestra-worker[data-activity="busy"]').count();

    result.phase = 'ten-jobs';
    await runCell(2);
    // the window: from the moment the panel lists the ten jobs running until the first state
    // that shows them all finished
    await page.waitForFunction(() =>
      document.querySelectorAll('#orchestra-nb-panel .orchestra-job[data-status="running"]').length === 10,
    null, { timeout: TIMEOUT, polling: 20 });
    const start = Date.now();
    const startFrames = frames.length;
    // for the README's picture: some jobs done, some under way
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#orchestra-nb-panel .orchestra-job')].slice(0, 10);
      const started = rows.filter((r) => !/^0\//.test(r.querySelector('.orchestra-job-count').textContent));
      return started.length >= 3 && rows.some((r) => r.dataset.status === 'running');
    }, null, { timeout: TIMEOUT, polling: 50 });
    if (cfg.docs_screenshot) await page.screenshot({ path: cfg.docs_screenshot });
    await page.waitForFunction(() =>
      document.querySelectorAll('#orchestra-nb-panel .orchestra-job[data-status="running"]').length === 0,
    null, { timeout: 2 * TIMEOUT, polling: 20 });
    const end = Date.now();
    result.frames = frames.filter((t) => t >= start && t <= end).length;
    result.window_s = (end - start) / 1000;
    result.rate = result.frames / result.window_s;
    result.frames_total = frames.length - startFrames;
    result.jobs_seen = await panel.locator('.orchestra-job').count();

    result.phase = 'final';
    await runCell(3);
    const out = await cell(3).locator('.jp-OutputArea-output').first().textContent();
    result.final = JSON.parse(out.trim());
    result.ok = true;
    result.phase = 'done';
  } catch (e) {
    result.message = `${result.phase}: ${e.message.split('\n')[0]}`;
    result.ok = false;
    if (page && cfg.screenshot) await page.screenshot({ path: cfg.screenshot.replace(/\.png$/, '-failed.png') }).catch(() => {});
  } finally {
    if (ctx) await ctx.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  }
  result.elapsed_s = (Date.now() - t0) / 1000;
  process.stdout.write(JSON.stringify(result) + '\n');
  if (!result.ok) console.error(`panel.js: FAILED: ${result.message}`);
  return result.ok ? 0 : 1;
}

main().then((code) => { process.exitCode = code; }, (e) => { console.error(e); process.exitCode = 1; });
