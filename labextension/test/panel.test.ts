// Unit tests of the panel's message handling and rendering: kernel messages go through the same
// parse -> controller -> DOM path as in JupyterLab, rendered in jsdom; clicks are real DOM events
// and what the panel would send over the comm is recorded.
import assert from 'node:assert/strict';
import { beforeEach, describe, test } from 'node:test';
import { JSDOM } from 'jsdom';

import { ACK_INTERVAL_MS, HISTORY_LENGTH, PanelController } from '../src/controller';
import { barSegments, formatBytes, formatDuration, jobEta, jobRate, sparklinePoints } from '../src/format';
import {
  cancelMessage,
  PanelMessage,
  parseKernelMessage,
  pauseMessage,
  ProtocolError,
  resizeMessage
} from '../src/protocol';

type Json = Record<string, unknown>;

function counts(partial: Record<string, number> = {}): Json {
  return { PENDING: 0, RUNNING: 0, SUCCEEDED: 0, FAILED: 0, RETRYING: 0, CANCELLED: 0, SCHEDULED: 0, ...partial };
}

function job(id: number, over: Json = {}): Json {
  return {
    id,
    pool: 1,
    name: `job${id}`,
    total: 100,
    read: 100,
    counts: counts({ SUCCEEDED: 40, RUNNING: 2, PENDING: 58 }),
    done: 40,
    elapsed: 4,
    finished: false,
    cancelled: false,
    paused: false,
    failures: [],
    ...over
  };
}

function worker(id: number, over: Json = {}): Json {
  return {
    id,
    pid: 1000 + id,
    state: 'ready',
    activity: 'busy',
    job: 1,
    item: id,
    tasks_done: 3,
    cpu_percent: 50,
    memory_bytes: 50 * 1024 * 1024,
    stalled: false,
    ...over
  };
}

function pool(id: number, over: Json = {}): Json {
  return {
    id,
    name: id === 1 ? 'default' : `pool-${id}`,
    default: id === 1,
    backend: 'local',
    state: 'running',
    target_workers: 2,
    queued: 58,
    can_pause: true,
    pause_reason: '',
    can_resize: true,
    resize_reason: '',
    max_workers: 1024,
    workers: [worker(0), worker(1)],
    ...over
  };
}

function state(seq: number, over: Json = {}): Json {
  return {
    type: 'state',
    version: 2,
    seq,
    pools: [pool(1)],
    jobs: [job(1)],
    ...over
  };
}

let dom: JSDOM;
let sent: PanelMessage[];
let clock: number;
let controller: PanelController;

function $(sel: string): HTMLElement {
  const e = controller.view.node.querySelector(sel);
  assert.ok(e, `no element ${sel}`);
  return e as HTMLElement;
}

function click(e: Element): void {
  e.dispatchEvent(new dom.window.MouseEvent('click', { bubbles: true }));
}

beforeEach(() => {
  dom = new JSDOM('<!doctype html><body></body>');
  sent = [];
  clock = 0;
  controller = new PanelController(dom.window.document, m => sent.push(m), () => clock);
  dom.window.document.body.append(controller.view.node);
});

describe('parseKernelMessage', () => {
  test('accepts a state message and keeps its data', () => {
    const msg = parseKernelMessage(state(3));
    assert.equal(msg.type, 'state');
    if (msg.type === 'state') {
      assert.equal(msg.seq, 3);
      assert.equal(msg.jobs[0].counts.SUCCEEDED, 40);
      assert.equal(msg.jobs[0].pool, 1);
      assert.equal(msg.jobs[0].paused, false);
      assert.equal(msg.pools[0].workers[1].pid, 1001);
      assert.equal(msg.pools[0].name, 'default');
      assert.equal(msg.pools[0].can_pause, true);
    }
  });

  test('names the culprit of a malformed message', () => {
    const bad = state(1, { jobs: [job(1, { counts: counts({ FAILED: -1 }) })] });
    assert.throws(() => parseKernelMessage(bad), (e: unknown) => {
      assert.ok(e instanceof ProtocolError);
      assert.equal(e.path, 'state.jobs[0].counts.FAILED');
      assert.match(e.message, /must be an integer >= 0, got -1/);
      return true;
    });
    assert.throws(() => parseKernelMessage({ type: 'state', version: 1, seq: 1 }), /state.version is 1, this panel speaks 2/);
    assert.throws(() => parseKernelMessage({ type: 'gossip' }), /message.type is unknown: "gossip"/);
    assert.throws(() => parseKernelMessage([]), /message must be an object/);
    assert.throws(
      () => parseKernelMessage(state(1, { pools: [pool(1, { workers: [worker(0, { pid: 'x' })] })] })),
      /state.pools\[0\].workers\[0\].pid/
    );
    assert.throws(() => parseKernelMessage(state(1, { jobs: [job(1, { paused: 'no' })] })), /state.jobs\[0\].paused must be true or false/);
    assert.throws(() => parseKernelMessage(state(1, { jobs: [job(1, { pool: 0 })] })), /state.jobs\[0\].pool must be an integer >= 1/);
    assert.throws(() => parseKernelMessage(state(1, { pools: [pool(1, { can_resize: 1 })] })), /state.pools\[0\].can_resize/);
  });

  test('accepts no pool, results, tracebacks and errors', () => {
    assert.deepEqual((parseKernelMessage(state(1, { pools: [], jobs: [] })) as { pools: unknown }).pools, []);
    assert.deepEqual(parseKernelMessage({ type: 'result', request: 'cancel', ok: true, message: 'cancelling', job_id: 4 }), {
      type: 'result', request: 'cancel', ok: true, message: 'cancelling', job_id: 4
    });
    assert.deepEqual(
      parseKernelMessage({ type: 'result', request: 'pause', ok: true, message: 'pausing job 4', job_id: 4, paused: true }),
      { type: 'result', request: 'pause', ok: true, message: 'pausing job 4', job_id: 4, paused: true }
    );
    assert.throws(() => parseKernelMessage({ type: 'result', request: 'pause', ok: true, message: '', paused: 1 }), /result.paused/);
    assert.equal(parseKernelMessage({ type: 'error', message: 'no' }).type, 'error');
    assert.throws(() => parseKernelMessage({ type: 'traceback', job_id: 1, item: 2, exception: 'E' }), /traceback.text/);
  });
});

describe('outgoing messages', () => {
  test('are checked before they are sent', () => {
    assert.deepEqual(cancelMessage(7), { type: 'cancel', job_id: 7 });
    assert.deepEqual(resizeMessage(2, 3, 8), { type: 'resize', pool: 2, workers: 3 });
    assert.throws(() => resizeMessage(2, 0, 8), /workers must be an integer from 1 to 8, got 0/);
    assert.throws(() => resizeMessage(2, 2.5, 8), RangeError);
    assert.throws(() => resizeMessage(0, 2, 8), /pool must be an integer from 1/);
    assert.throws(() => cancelMessage(-1), /job_id/);
    assert.deepEqual(pauseMessage(7, true), { type: 'pause', job_id: 7, paused: true });
    assert.deepEqual(pauseMessage(7, false), { type: 'pause', job_id: 7, paused: false });
    assert.throws(() => pauseMessage(7, 'yes' as never), /paused must be true or false, got "yes"/);
    assert.throws(() => pauseMessage(-1, true), /job_id/);
  });
});

describe('format', () => {
  test('durations, sizes, rate and ETA', () => {
    assert.equal(formatDuration(3.25), '3.3 s');
    assert.equal(formatDuration(75), '1:15');
    assert.equal(formatDuration(3725), '1:02:05');
    assert.equal(formatDuration(null), '–');
    assert.equal(formatBytes(50 * 1024 * 1024), '50.0 MiB');
    assert.equal(formatBytes(512), '512 B');
    const j = parseKernelMessage(state(1)) as { jobs: Parameters<typeof jobRate>[0][] };
    assert.equal(jobRate(j.jobs[0]), 10);
    assert.equal(jobEta(j.jobs[0]), 6);
  });

  test('bar segments are shares of the total', () => {
    const segs = barSegments(counts({ SUCCEEDED: 25, FAILED: 5, RUNNING: 10, PENDING: 60 }) as never, 100);
    assert.deepEqual(Object.fromEntries(segs.map(s => [s.state, s.percent])), {
      SUCCEEDED: 25, FAILED: 5, CANCELLED: 0, RETRYING: 0, RUNNING: 10
    });
    // unknown total (lazy input): shares of what was read so far
    const lazy = barSegments(counts({ SUCCEEDED: 5, PENDING: 5 }) as never, null);
    assert.equal(lazy.find(s => s.state === 'SUCCEEDED')?.percent, 50);
  });

  test('sparkline points span the box', () => {
    assert.equal(sparklinePoints([0, 50, 100], 60, 16, 100), '0.0,16.0 30.0,8.0 60.0,0.0');
    assert.equal(sparklinePoints([], 60, 16), '');
  });
});

describe('rendering', () => {
  test('a state renders the pool, the workers and the jobs newest first', () => {
    controller.handle(state(1, { jobs: [job(1), job(3, { name: 'sweep' }), job(2)] }));
    assert.equal($('.orchestra-pool-name').textContent, 'default');
    assert.equal($('.orchestra-pool-badge').textContent, 'local · orchestra.map');
    assert.match($('.orchestra-pool-line').textContent!, /running · 2 of 2 worker\(s\) · 58 queued/);
    assert.equal(($('.orchestra-resize-input') as HTMLInputElement).value, '2');
    const rows = [...controller.view.node.querySelectorAll('.orchestra-job')] as HTMLElement[];
    assert.deepEqual(rows.map(r => r.dataset.jobId), ['3', '2', '1']);
    assert.equal(rows[0].querySelector('.orchestra-job-name')!.textContent, 'sweep #3');
    assert.equal(rows[0].querySelector('.orchestra-job-count')!.textContent, '40/100');
    assert.equal(rows[0].querySelector('.orchestra-job-stats')!.textContent, '10.0/s · ETA 6.0 s · elapsed 4.0 s');
    assert.equal(rows[0].querySelector('.orchestra-job-states')!.textContent, 'running 2');
    const seg = rows[0].querySelector('.orchestra-seg[data-state="SUCCEEDED"]') as HTMLElement;
    assert.equal(seg.style.width, '40%');
    const w = [...controller.view.node.querySelectorAll('.orchestra-worker')].map(r =>
      [...r.querySelectorAll('td')].slice(0, 5).map(td => td.textContent));
    assert.deepEqual(w, [['1000', 'busy', '#1[0]', '50%', '50.0 MiB'], ['1001', 'busy', '#1[1]', '50%', '50.0 MiB']]);
    assert.equal($('.orchestra-pool .orchestra-empty').hidden, true);
    assert.equal($('.orchestra-no-pool').hidden, true);
  });

  test('every open pool has its section with its own workers and jobs; a closed one goes', () => {
    const side = pool(2, { name: 'side', target_workers: 1, queued: 0, workers: [worker(0, { pid: 2000, job: 5, item: 0 })] });
    controller.handle(state(1, { pools: [pool(1), side], jobs: [job(5, { pool: 2 }), job(4), job(1)] }));
    const sections = [...controller.view.node.querySelectorAll('.orchestra-pool')] as HTMLElement[];
    assert.deepEqual(sections.map(s => [s.dataset.poolId, s.dataset.poolName, s.dataset.default]),
      [['1', 'default', 'true'], ['2', 'side', 'false']]);
    const jobsIn = (s: Element): string[] =>
      [...s.querySelectorAll('.orchestra-job')].map(r => (r as HTMLElement).dataset.jobId!);
    assert.deepEqual(jobsIn(sections[0]), ['4', '1']);
    assert.deepEqual(jobsIn(sections[1]), ['5']);
    assert.equal(sections[1].querySelector('.orchestra-pool-badge')!.textContent, 'local');
    assert.deepEqual([...sections[1].querySelectorAll('.orchestra-worker-pid')].map(td => td.textContent), ['2000']);
    assert.equal(sections[0].querySelectorAll('.orchestra-worker').length, 2);
    // the side pool closes: its section and its jobs go, the default pool's stay
    controller.handle(state(2, { pools: [pool(1)], jobs: [job(5, { pool: 2 }), job(4), job(1)] }));
    assert.deepEqual([...controller.view.node.querySelectorAll('.orchestra-pool')].map(s => (s as HTMLElement).dataset.poolId), ['1']);
    assert.equal(controller.view.node.querySelector('.orchestra-job[data-job-id="5"]'), null);
    assert.equal(controller.histories.has(2000), false);
    // no pool at all
    controller.handle(state(3, { pools: [], jobs: [] }));
    assert.equal($('.orchestra-no-pool').hidden, false);
    assert.equal(controller.view.node.querySelectorAll('.orchestra-pool').length, 0);
  });

  test('rows are updated in place, so a button keeps its identity across updates', () => {
    controller.handle(state(1));
    const cancel = $('.orchestra-job[data-job-id="1"] .orchestra-cancel');
    controller.handle(state(2, { jobs: [job(1, { done: 50, counts: counts({ SUCCEEDED: 50, PENDING: 50 }) })] }));
    assert.equal($('.orchestra-job[data-job-id="1"] .orchestra-cancel'), cancel);
    assert.equal($('.orchestra-job-count').textContent, '50/100');
  });

  test('Cancel sends a cancel for that job; a finished job shows its end and no buttons', () => {
    controller.handle(state(1, { jobs: [job(2), job(1)] }));
    sent.length = 0;
    click($('.orchestra-job[data-job-id="1"] .orchestra-cancel'));
    assert.deepEqual(sent, [{ type: 'cancel', job_id: 1 }]);
    assert.equal(($('.orchestra-job[data-job-id="1"] .orchestra-cancel') as HTMLButtonElement).disabled, true);
    controller.handle({ type: 'result', request: 'cancel', ok: true, message: 'cancelling', job_id: 1 });
    assert.equal($('.orchestra-notice').textContent, 'cancelling');
    const ended = job(1, { finished: true, cancelled: true, counts: counts({ SUCCEEDED: 40, CANCELLED: 60 }), done: 100 });
    clock += ACK_INTERVAL_MS;
    controller.handle(state(2, { jobs: [job(2), ended] }));
    const row = $('.orchestra-job[data-job-id="1"]');
    assert.equal(row.dataset.status, 'cancelled');
    assert.equal(row.querySelector('.orchestra-job-status')!.textContent, 'cancelled');
    assert.equal((row.querySelector('.orchestra-cancel') as HTMLElement).hidden, true);
    assert.doesNotMatch(row.querySelector('.orchestra-job-stats')!.textContent!, /ETA/);
    assert.equal(row.querySelector('.orchestra-job-states')!.textContent, 'cancelled 60');
  });

  test('Pause is disabled with the reason as its tooltip when the backend cannot pause', () => {
    controller.handle(state(1, { pools: [pool(1, { can_pause: false, pause_reason: 'the odd backend cannot pause a job' })] }));
    const pause = $('.orchestra-pause') as HTMLButtonElement;
    assert.equal(pause.disabled, true);
    assert.equal(pause.textContent, 'Pause');
    assert.equal(pause.title, 'the odd backend cannot pause a job');
    sent.length = 0;
    click(pause);
    assert.deepEqual(sent, []);
  });

  test('Pause sends a pause, the state shows the job paused, Resume sends a resume', () => {
    controller.handle(state(1));
    sent.length = 0;
    const pause = $('.orchestra-job[data-job-id="1"] .orchestra-pause') as HTMLButtonElement;
    assert.equal(pause.disabled, false);
    assert.equal(pause.textContent, 'Pause');
    click(pause);
    assert.deepEqual(sent, [{ type: 'pause', job_id: 1, paused: true }]);
    assert.equal(pause.disabled, true);
    assert.equal(pause.textContent, 'Pausing…');
    // the kernel accepted, but its next state still shows the job running: keep waiting
    controller.handle({ type: 'result', request: 'pause', ok: true, message: 'pausing job 1', job_id: 1, paused: true });
    controller.handle(state(2));
    assert.equal(pause.textContent, 'Pausing…');
    controller.handle(state(3, { jobs: [job(1, { paused: true, counts: counts({ SUCCEEDED: 42, PENDING: 58 }), done: 42 })] }));
    const row = $('.orchestra-job[data-job-id="1"]');
    assert.equal(row.dataset.status, 'paused');
    assert.equal(row.dataset.paused, 'true');
    assert.equal(row.querySelector('.orchestra-job-status')!.textContent, 'paused');
    assert.doesNotMatch(row.querySelector('.orchestra-job-stats')!.textContent!, /ETA/);
    assert.equal($('.orchestra-job[data-job-id="1"] .orchestra-pause'), pause); // same button
    assert.equal(pause.disabled, false);
    assert.equal(pause.textContent, 'Resume');
    sent.length = 0;
    click(pause);
    assert.deepEqual(sent, [{ type: 'pause', job_id: 1, paused: false }]);
    assert.equal(pause.textContent, 'Resuming…');
    controller.handle(state(4, { jobs: [job(1)] }));
    assert.equal(pause.textContent, 'Pause');
    assert.equal(row.dataset.status, 'running');
  });

  test('a refused Pause shows why and gives the button back', () => {
    controller.handle(state(1));
    const pause = $('.orchestra-pause') as HTMLButtonElement;
    click(pause);
    assert.equal(pause.disabled, true);
    controller.handle({ type: 'result', request: 'pause', ok: false, job_id: 1, paused: true,
      message: 'job 1 (on all workers: f) runs on chosen workers, one call each: it cannot be paused' });
    assert.match($('.orchestra-notice').textContent!, /cannot be paused/);
    assert.equal($('.orchestra-notice').classList.contains('orchestra-notice-error'), true);
    assert.equal(pause.disabled, false);
    assert.equal(pause.textContent, 'Pause');
  });

  test('Resize sends the number typed for that pool, and refuses one out of range', () => {
    controller.handle(state(1));
    sent.length = 0;
    const input = $('.orchestra-resize-input') as HTMLInputElement;
    input.value = '5';
    input.dispatchEvent(new dom.window.Event('input'));
    click($('.orchestra-resize-button'));
    assert.deepEqual(sent, [{ type: 'resize', pool: 1, workers: 5 }]);
    assert.equal($('.orchestra-notice').textContent, 'resizing default to 5 worker(s)…');
    input.value = '0';
    input.dispatchEvent(new dom.window.Event('input'));
    click($('.orchestra-resize-button'));
    assert.equal(sent.length, 1);
    assert.match($('.orchestra-notice').textContent!, /workers must be an integer from 1 to 1024/);
    // the value being edited is not overwritten by the next state
    controller.handle(state(2));
    assert.equal(input.value, '0');
  });

  test('Resize applies to the pool whose control is used; a pool that cannot resize says why', () => {
    const dbg = pool(3, { name: 'dbg', backend: 'inline', can_resize: false, resize_reason: 'the inline backend cannot resize', workers: [] });
    controller.handle(state(1, { pools: [pool(1), pool(2, { name: 'side' }), dbg] }));
    sent.length = 0;
    const side = $('.orchestra-pool[data-pool-id="2"]');
    const input = side.querySelector('.orchestra-resize-input') as HTMLInputElement;
    input.value = '3';
    input.dispatchEvent(new dom.window.Event('input'));
    click(side.querySelector('.orchestra-resize-button')!);
    assert.deepEqual(sent, [{ type: 'resize', pool: 2, workers: 3 }]);
    assert.equal(($('.orchestra-pool[data-pool-id="1"] .orchestra-resize-input') as HTMLInputElement).value, '2');
    const button = $('.orchestra-pool[data-pool-id="3"] .orchestra-resize-button') as HTMLButtonElement;
    assert.equal(button.disabled, true);
    assert.equal(button.title, 'the inline backend cannot resize');
  });

  test('failures list item, exception, and show the traceback on request', () => {
    const failing = job(4, {
      counts: counts({ SUCCEEDED: 1, FAILED: 2 }), total: 3, done: 3, finished: true,
      failures: [{ item: 1, type: 'ValueError', message: 'odd item 1' }]
    });
    controller.handle(state(1, { jobs: [failing] }));
    const details = $('.orchestra-job[data-job-id="4"] .orchestra-failures') as HTMLDetailsElement;
    assert.equal(details.hidden, false);
    assert.equal(details.querySelector('summary')!.textContent, '2 failures (first 1 listed)');
    assert.equal(details.querySelector('.orchestra-failure-text')!.textContent, 'item 1: ValueError: odd item 1');
    assert.equal($('.orchestra-job').dataset.status, 'failed');
    sent.length = 0;
    click(details.querySelector('.orchestra-show-traceback')!);
    assert.deepEqual(sent, [{ type: 'traceback', job_id: 4, item: 1 }]);
    controller.handle({ type: 'traceback', job_id: 4, item: 1, exception: 'ValueError: odd item 1', text: 'Traceback...\nValueError: odd item 1' });
    const pre = $('.orchestra-job[data-job-id="4"] .orchestra-traceback');
    assert.equal(pre.hidden, false);
    assert.match(pre.textContent!, /^item 1: ValueError: odd item 1\n\nTraceback/);
  });

  test('worker history feeds the sparklines, bounded, and forgets workers that left', () => {
    for (let seq = 1; seq <= HISTORY_LENGTH + 5; seq++) {
      controller.handle(state(seq, { pools: [pool(1, { workers: [worker(0, { cpu_percent: seq % 2 ? 100 : 0 }), worker(1)] })] }));
    }
    assert.equal(controller.histories.get(1000)!.cpu.length, HISTORY_LENGTH);
    const line = controller.view.node.querySelector('.orchestra-worker[data-worker-id="0"] .orchestra-spark-cpu')!;
    assert.equal(line.getAttribute('points')!.split(' ').length, HISTORY_LENGTH);
    controller.handle(state(100, { pools: [pool(1, { workers: [worker(1)] })] }));
    assert.equal(controller.histories.has(1000), false);
    assert.equal(controller.view.node.querySelectorAll('.orchestra-worker').length, 1);
  });

  test('acks are sent at most every ACK_INTERVAL_MS', () => {
    controller.handle(state(1));
    controller.handle(state(2));
    clock += ACK_INTERVAL_MS;
    controller.handle(state(3));
    assert.deepEqual(sent, [{ type: 'ack', seq: 1 }, { type: 'ack', seq: 3 }]);
  });

  test('a malformed message is shown, not rendered', () => {
    controller.handle(state(1));
    assert.equal(controller.handle({ type: 'state', version: 2, seq: 2, pools: 'x', jobs: [] }), null);
    assert.match($('.orchestra-notice').textContent!, /state.pools must be a list/);
    assert.equal(controller.view.node.querySelectorAll('.orchestra-job').length, 1);
  });
});
