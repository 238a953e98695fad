#!/usr/bin/env node
// Opens a notebook in JupyterLab with Debian's headless chromium, runs all cells, waits for a widget
// condition, takes a screenshot and prints one JSON result line on stdout.
//
// Usage: node run_notebook.js CONFIG   (CONFIG: a JSON string or the path of a JSON file)
// Config keys (defaults in DEFAULTS): url, token, notebook (path relative to the server root),
// wait_selector + expect_width, text_selector + expect_text, error_selector, fail_on_traceback,
// kernel_timeout_ms, run_timeout_ms, start_ms, sample_ms, settle_ms, screenshot, scroll_to, chromium, viewport,
// click_when + click_selector (click once, as a user would, when click_when first matches), save (File > Save at
// the end; the result's "saved" says whether the save went through), probe + probe_after_ms (evaluate a JS
// expression in the page that long after the run: result.probe).
// Exit codes: 0 condition met, 1 timeout / traceback / driver error, 2 bad config.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const PANEL = '.jp-NotebookPanel:not(.lm-mod-hidden)';
const DEFAULTS = {
  wait_selector: '.widget-hprogress .progress-bar',
  expect_width: '100%', // every element matching wait_selector must reach it; null: presence is enough
  text_selector: '.widget-html-content, .widget-label',
  expect_text: null, // some element matching text_selector must contain it
  error_selector: '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]',
  fail_on_traceback: true, // stop early when a cell shows a traceback
  kernel_timeout_ms: 60000,
  run_timeout_ms: 60000,
  sample_ms: 50,
  start_ms: 5000, // Run All is retried if no cell shows [*] or [n] within this
  settle_ms: 5000, // after success, wait this long at most for every cell to finish ([*] gone)
  screenshot: null,
  scroll_to: null, // selector (in the notebook) scrolled into view before the screenshot; Run All ends at the last cell
  chromium: '/usr/bin/chromium',
  viewport: { width: 1200, height: 800 },
  click_when: null, // selector (in the notebook): when it first matches, click click_selector once
  click_selector: null,
  save: false, // File > Save Notebook after the run (and the settle wait)
  probe: null, // a JS expression evaluated in the page after waiting probe_after_ms: result.probe
  probe_after_ms: 0,
};

function loadConfig(arg) {
  if (!arg) throw new Error('usage: node run_notebook.js CONFIG_JSON_OR_FILE');
  const cfg = { ...DEFAULTS, ...JSON.parse(arg.trim().startsWith('{') ? arg : fs.readFileSync(arg, 'utf8')) };
  for (const key of ['url', 'token', 'notebook']) if (!cfg[key]) throw new Error(`config: "${key}" is required`);
  return cfg;
}

async function waitForKernel(cfg, deadline) {
  const url = `${cfg.url.replace(/\/$/, '')}/api/sessions`;
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

// Run > Run All Cells through the menu bar; Lumino menu items carry their command id.
async function runAll(page) {
  await page.locator(`${PANEL} .jp-Notebook`).first().click({ position: { x: 5, y: 5 } });
  await page.locator('.lm-MenuBar-item', { hasText: /^Run$/ }).click();
  await page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click();
}

// Runs in the page: everything the result reports, scoped to the visible notebook.
function snapshot([panel, waitSel, textSel, errSel]) {
  const q = (sel) => Array.from(document.querySelectorAll(sel.split(',').map((s) => `${panel} ${s.trim()}`).join(', ')));
  return {
    widths: q(waitSel).map((e) => e.style.width),
    present: q(waitSel).length,
    // innerText is '' in cells that content-visibility:auto skips (scrolled away): fall back to textContent.
    texts: q(textSel).map((e) => (e.innerText || e.textContent).trim()),
    errors: q(errSel).map((e) => e.innerText),
    kernel: (document.querySelector(`${panel} .jp-Notebook-ExecutionIndicator`) || {}).dataset?.status ?? null,
  };
}

async function main() {
  let cfg;
  try {
    cfg = loadConfig(process.argv[2]);
  } catch (e) {
    console.error(`run_notebook.js: ${e.message}`);
    return 2;
  }
  const t0 = Date.now();
  const elapsed = () => (Date.now() - t0) / 1000;
  const result = {
    ok: false, phase: 'launch', message: '', elapsed_s: 0, kernel_ready_s: null, run_s: null, run_all_attempts: 0, settled: null,
    widths_over_time: [], label_texts: [], errors: [], console_errors: [], screenshot: cfg.screenshot,
  };
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'orchestra-chromium-'));
  let ctx = null;
  let page = null;
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

    result.phase = 'open';
    const nb = cfg.notebook.split('/').map(encodeURIComponent).join('/');
    // ?reset: ignore any saved workspace, so only this notebook is open.
    await page.goto(`${cfg.url.replace(/\/$/, '')}/lab/tree/${nb}?reset&token=${encodeURIComponent(cfg.token)}`,
      { timeout: cfg.kernel_timeout_ms });
    result.phase = 'kernel';
    // The toolbar indicator reads "idle" before any kernel is attached, and Run All then silently clears the
    // cells instead of running them; so also wait until the server sees this page's websocket on an idle kernel.
    await waitForKernel(cfg, Date.now() + cfg.kernel_timeout_ms);
    await page.waitForSelector(`${PANEL} .jp-Notebook-ExecutionIndicator[data-status="idle"]`,
      { timeout: cfg.kernel_timeout_ms });
    result.kernel_ready_s = elapsed();

    result.phase = 'run-all';
    const tRun = Date.now();
    for (result.run_all_attempts = 1; ; result.run_all_attempts++) {
      await runAll(page);
      const started = await page.waitForFunction((panel) =>
        Array.from(document.querySelectorAll(`${panel} .jp-InputPrompt`)).some((e) => /\[(\*|\d+)\]/.test(e.textContent)),
      PANEL, { timeout: cfg.start_ms, polling: 50 }).then(() => true, () => false);
      if (started) break;
      if (result.run_all_attempts >= 3) throw new Error(`no cell started after ${result.run_all_attempts} Run All Cells`);
    }

    result.phase = 'wait';
    let last = '';
    let snap;
    result.clicked = null;
    for (;;) {
      if (cfg.click_when && result.clicked === null && (await page.locator(`${PANEL} ${cfg.click_when}`).count()) > 0) {
        await page.locator(`${PANEL} ${cfg.click_selector}`).first().click({ timeout: 5000 });
        result.clicked = +elapsed().toFixed(3);
      }
      snap = await page.evaluate(snapshot, [PANEL, cfg.wait_selector, cfg.text_selector, cfg.error_selector]);
      const key = JSON.stringify(snap.widths);
      if (key !== last) { result.widths_over_time.push({ t: +elapsed().toFixed(3), widths: snap.widths }); last = key; }
      const widthOk = snap.present > 0 && (cfg.expect_width == null || snap.widths.every((w) => w === cfg.expect_width));
      const textOk = cfg.expect_text == null || snap.texts.some((t) => t.includes(cfg.expect_text));
      if (widthOk && textOk) { result.ok = true; break; }
      if (cfg.fail_on_traceback && snap.errors.some((e) => e.includes('Traceback'))) {
        result.message = 'a cell raised (see errors)';
        break;
      }
      if (Date.now() - tRun > cfg.run_timeout_ms) {
        result.message = `timeout after ${cfg.run_timeout_ms} ms waiting for ${cfg.wait_selector}` +
          (cfg.expect_width == null ? ' to appear' : ` width ${cfg.expect_width}`) +
          (cfg.expect_text == null ? '' : ` and text ${JSON.stringify(cfg.expect_text)} in ${cfg.text_selector}`) +
          `; last widths=${JSON.stringify(snap.widths)} texts=${JSON.stringify(snap.texts)} kernel=${snap.kernel}`;
        break;
      }
      await page.waitForTimeout(cfg.sample_ms);
    }
    result.run_s = (Date.now() - tRun) / 1000;
    if (result.ok && cfg.settle_ms > 0) {
      // Non-fatal: let the last cell's reply arrive ([*] -> [n]) so the screenshot shows the final state.
      result.settled = await page.waitForFunction((panel) =>
        !Array.from(document.querySelectorAll(`${panel} .jp-InputPrompt`)).some((e) => e.textContent.includes('*')),
      PANEL, { timeout: cfg.settle_ms, polling: 50 }).then(() => true, () => false);
      snap = await page.evaluate(snapshot, [PANEL, cfg.wait_selector, cfg.text_selector, cfg.error_selector]);
    }
    result.label_texts = snap.texts;
    result.errors = snap.errors;
    if (cfg.probe) {
      result.phase = 'probe';
      await page.waitForTimeout(cfg.probe_after_ms);
      result.probe = await page.evaluate(cfg.probe);
    }
    if (cfg.save) {
      result.phase = 'save';
      await page.locator('.lm-MenuBar-item', { hasText: /^File$/ }).click();
      await page.locator('.lm-Menu-item[data-command="docmanager:save"]').click();
      // The tab's dirty marker goes away once the contents API accepted the save.
      result.saved = await page.waitForFunction(() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty'),
        null, { timeout: 10000, polling: 50 }).then(() => true, () => false);
    }
    result.phase = 'screenshot';
    if (cfg.scroll_to) {
      result.phase = 'scroll';
      await page.locator(`${PANEL} ${cfg.scroll_to}`).first().scrollIntoViewIfNeeded({ timeout: 5000 })
        .catch((e) => { result.message = `scroll_to: ${e.message.split('\n')[0]}`; });
      await page.waitForTimeout(300); // let the windowed notebook render what scrolled in
      result.phase = 'screenshot';
    }
    if (cfg.screenshot) await page.screenshot({ path: cfg.screenshot });
    result.phase = 'done';
  } catch (e) {
    result.message = `${result.phase}: ${e.message.split('\n')[0]}`;
    result.ok = false;
    if (page && cfg.screenshot) await page.screenshot({ path: cfg.screenshot }).catch(() => {});
  } finally {
    if (ctx) await ctx.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  }
  result.elapsed_s = elapsed();
  process.stdout.write(JSON.stringify(result) + '\n');
  if (!result.ok) console.error(`run_notebook.js: FAILED: ${result.message}`);
  return result.ok ? 0 : 1;
}

main().then((code) => { process.exitCode = code; }, (e) => { console.error(e); process.exitCode = 1; });
