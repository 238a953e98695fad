#!/usr/bin/env node
// Drives the Orchestra side panel in JupyterLab (or Notebook 7) with Debian's headless chromium:
// runs the notebook's cells one by one, opens the panel, watches a background job's count rise,
// cancels it and resizes the default pool from the panel, pauses a job (its count stops while
// another job runs) and resumes it, watches a second pool appear in its own section and resizes
// that one, counts the panel comm's websocket frames while 10 jobs run, and sees the second pool
// drop out once it is shut down. Prints one JSON result line on stdout (exit 0 ok, 1 failed,
// 2 bad config).
//
// Usage: node panel.js CONFIG   (a JSON string or file) with keys url, token, notebook (relative to
// the server root), ui ('lab' or 'notebook'), screenshot, docs_screenshot (optional), chromium.
// The notebook's cells (test_panel_browser.py's CELLS): 0 set-up (%load_ext, pool ready), 1 a
// background map `bg`, 2 a background map `bg2` (paused and resumed), 3 a short map `check` run
// to its end while `bg2` is paused, 4 a pool `side` with a background map, 5 ten background maps
// `jobs`, 6 `side` shut down, 7 the final state printed as JSON.
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
    paused: null, resumed: null, pools_seen: null, side: null, pools_after_shutdown: null,
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
    const DEFAULT = '#orchestra-nb-panel .orchestra-pool[data-default="true"]';
    const SIDE = '#orchestra-nb-panel .orchestra-pool[data-pool-name="side"]';
    const READY = '.orchestra-worker[data-activity="idle"], .orchestra-worker[data-activity="busy"]';
    const readyIn = (section, n) => page.waitForFunction(([sel, n]) => {
      const s = document.querySelector(sel);
      return s && s.querySelectorAll('.orchestra-worker[data-activity="idle"], .orchestra-worker[data-activity="busy"]').length === n;
    }, [section, n], { timeout: TIMEOUT, polling: 50 });
    // the newest job row of a pool's section that is not one of `known`: its job id
    const newJob = async (section, known) => {
      const handle = await page.waitForFunction(([sel, known]) => {
        const row = [...document.querySelectorAll(`${sel} .orchestra-job`)].find((r) => !known.includes(r.dataset.jobId));
        return row ? row.dataset.jobId : null;
      }, [section, known], { timeout: TIMEOUT, polling: 50 });
      return handle.jsonValue();
    };
    const jobRow = (id) => panel.locator(`.orchestra-job[data-job-id="${id}"]`);
    const jobCount = async (id) => (await jobRow(id).locator('.orchestra-job-count').textContent()).trim();
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
    result.workers_before = await page.locator(`${DEFAULT} .orchestra-worker`).count();

    result.phase = 'background-map';
    await runCell(1);
    const bgId = await newJob(DEFAULT, []);
    const job = jobRow(bgId);
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
    await page.waitForFunction((id) => {
      const row = document.querySelector(`#orchestra-nb-panel .orchestra-job[data-job-id="${id}"]`);
      return row && row.dataset.status !== 'running';
    }, bgId, { timeout: TIMEOUT, polling: 50 });
    result.cancelled_status = await job.getAttribute('data-status');
    // the cell's own progress widget ends cancelled too
    await page.waitForFunction((sel) => {
      const label = document.querySelectorAll(sel)[1]?.querySelector('.widget-html-content');
      return label && /cancelled in/.test(label.textContent);
    }, `${NB} .jp-Notebook .jp-Cell`, { timeout: TIMEOUT, polling: 50 });
    result.cell_label = (await cell(1).locator('.widget-html-content').first().textContent()).trim();

    result.phase = 'resize';
    const target = result.workers_before + 1;
    await page.locator(`${DEFAULT} .orchestra-resize-input`).fill(String(target));
    await page.locator(`${DEFAULT} .orchestra-resize-button`).click();
    await readyIn(DEFAULT, target);
    result.workers_after = await page.locator(`${DEFAULT}`).locator(READY).count();

    result.phase = 'pause';
    await runCell(2);
    const bg2Id = await newJob(DEFAULT, [bgId]);
    const bg2 = jobRow(bg2Id);
    const pause = bg2.locator('.orchestra-pause');
    result.paused = { title_before: await pause.getAttribute('title'), label_before: (await pause.textContent()).trim() };
    await pause.click();
    // the job's state says paused, and once its running tasks are done none runs
    await page.waitForFunction((id) => {
      const row = document.querySelector(`#orchestra-nb-panel .orchestra-job[data-job-id="${id}"]`);
      return row && row.dataset.paused === 'true' && !/running/.test(row.querySelector('.orchestra-job-states').textContent);
    }, bg2Id, { timeout: TIMEOUT, polling: 50 });
    result.paused.status = await bg2.getAttribute('data-status');
    result.paused.label = (await pause.textContent()).trim();
    result.paused.count = await jobCount(bg2Id);
    // another job runs to its end on the same workers meanwhile: the paused count stays put
    await runCell(3);
    const checkId = await newJob(DEFAULT, [bgId, bg2Id]);
    await page.waitForFunction((id) => {
      const row = document.querySelector(`#orchestra-nb-panel .orchestra-job[data-job-id="${id}"]`);
      return row && row.dataset.status === 'done';
    }, checkId, { timeout: TIMEOUT, polling: 50 });
    result.paused.count_after_other_job = await jobCount(bg2Id);
    result.paused.status_after_other_job = await bg2.getAttribute('data-status');

    result.phase = 'second-pool';
    await runCell(4);
    await page.locator(SIDE).waitFor({ timeout: TIMEOUT });
    result.pools_seen = await page.$$eval('#orchestra-nb-panel .orchestra-pool', (ss) => ss.map((s) => s.dataset.poolName));
    const sideJobId = await newJob(SIDE, []);
    await readyIn(SIDE, 1);
    await page.locator(`${SIDE} .orchestra-resize-input`).fill('2');
    await page.locator(`${SIDE} .orchestra-resize-button`).click();
    await readyIn(SIDE, 2);
    result.side = {
      job_in_side: await page.locator(`${SIDE} .orchestra-job[data-job-id="${sideJobId}"]`).count(),
      job_in_default: await page.locator(`${DEFAULT} .orchestra-job[data-job-id="${sideJobId}"]`).count(),
      side_workers: await page.locator(SIDE).locator(READY).count(),
      default_workers: await page.locator(DEFAULT).locator(READY).count(),
    };
    // for the README's picture: two pools, a paused job, a cancelled one, one under way
    if (cfg.docs_screenshot) await page.screenshot({ path: cfg.docs_screenshot });

    result.phase = 'resume';
    await pause.click();
    await page.waitForFunction((id) => {
      const row = document.querySelector(`#orchestra-nb-panel .orchestra-job[data-job-id="${id}"]`);
      return row && row.dataset.status === 'done';
    }, bg2Id, { timeout: 2 * TIMEOUT, polling: 50 });
    result.resumed = { count: await jobCount(bg2Id), paused: await bg2.getAttribute('data-paused') };

    result.phase = 'ten-jobs';
    await runCell(5);
    // the window: from the moment the panel lists the ten jobs running until the first state
    // that shows them all finished
    await page.waitForFunction((sel) =>
      document.querySelectorAll(`${sel} .orchestra-job[data-status="running"]`).length === 10,
    DEFAULT, { timeout: TIMEOUT, polling: 20 });
    const start = Date.now();
    const startFrames = frames.length;
    await page.waitForFunction((sel) =>
      document.querySelectorAll(`${sel} .orchestra-job[data-status="running"]`).length === 0,
    DEFAULT, { timeout: 2 * TIMEOUT, polling: 20 });
    const end = Date.now();
    result.frames = frames.filter((t) => t >= start && t <= end).length;
    result.window_s = (end - start) / 1000;
    result.rate = result.frames / result.window_s;
    result.frames_total = frames.length - startFrames;
    result.jobs_seen = await page.locator(`${DEFAULT} .orchestra-job`).count();

    result.phase = 'shutdown-second-pool';
    await runCell(6);
    await page.locator(SIDE).waitFor({ state: 'detached', timeout: TIMEOUT });
    result.pools_after_shutdown = await page.$$eval('#orchestra-nb-panel .orchestra-pool', (ss) => ss.map((s) => s.dataset.poolName));

    result.phase = 'final';
    await runCell(7);
    const out = await cell(7).locator('.jp-OutputArea-output').first().textContent();
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
