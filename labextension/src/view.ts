// The panel's DOM, built and updated in place: one section per open pool (its line, resize
// control, workers and jobs), rows kept by pool, job and worker id, so a button under the mouse
// survives the next update (a rebuilt one would swallow the click).
// No JupyterLab imports: the unit tests render it in jsdom.
import {
  barSegments,
  formatBytes,
  formatDuration,
  formatRate,
  jobEta,
  jobRate,
  jobStatus,
  sparklinePoints
} from './format';
import { Job, PoolInfo, StateMessage, Worker } from './protocol';

export interface ViewCallbacks {
  cancel(jobId: number): void;
  pause(jobId: number, paused: boolean): void;
  resize(poolId: number, workers: number, maxWorkers: number): void;
  traceback(jobId: number, item: number): void;
  notice(text: string, error: boolean): void;
}

export interface History {
  cpu: number[];
  memory: number[];
}

const SVG = 'http://www.w3.org/2000/svg';
const SPARK_W = 40;
const SPARK_H = 16;

function el<K extends keyof HTMLElementTagNameMap>(
  doc: Document,
  tag: K,
  cls?: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const e = doc.createElement(tag);
  if (cls) {
    e.className = cls;
  }
  if (text !== undefined) {
    e.textContent = text;
  }
  return e;
}

function setText(e: Element, text: string): void {
  if (e.textContent !== text) {
    e.textContent = text;
  }
}

function sameNodes(parent: Element, nodes: Element[]): boolean {
  const current = parent.children;
  return current.length === nodes.length && nodes.every((n, i) => current[i] === n);
}

class JobRow {
  readonly node: HTMLElement;
  private name: HTMLElement;
  private status: HTMLElement;
  private cancel: HTMLButtonElement;
  private pause: HTMLButtonElement;
  private bar: HTMLElement;
  private segments = new Map<string, HTMLElement>();
  private count: HTMLElement;
  private stats: HTMLElement;
  private states: HTMLElement;
  private failures: HTMLDetailsElement;
  private failuresSummary: HTMLElement;
  private failuresList: HTMLElement;
  private failuresKey = '';
  /** what a click on Pause/Resume asked for, until a state shows it (or it is refused) */
  private pausePending: boolean | null = null;
  private paused = false;
  private last: { job: Job; pool: PoolInfo | undefined } | null = null;
  readonly traceback: HTMLPreElement;

  constructor(
    private doc: Document,
    readonly id: number,
    callbacks: ViewCallbacks
  ) {
    this.node = el(doc, 'div', 'orchestra-job');
    this.node.dataset.jobId = String(id);
    const head = el(doc, 'div', 'orchestra-job-head');
    this.name = el(doc, 'span', 'orchestra-job-name');
    this.status = el(doc, 'span', 'orchestra-job-status');
    this.cancel = el(doc, 'button', 'orchestra-button orchestra-cancel', 'Cancel');
    this.cancel.title = 'Cancel this job: pending tasks are dropped, running ones interrupted';
    this.cancel.addEventListener('click', () => {
      this.cancel.disabled = true;
      setText(this.cancel, 'Cancelling…');
      callbacks.cancel(id);
    });
    this.pause = el(doc, 'button', 'orchestra-button orchestra-pause', 'Pause');
    this.pause.addEventListener('click', () => {
      if (this.pause.disabled) {
        return; // a synthetic click on a disabled button (a browser sends none)
      }
      const want = !this.paused;
      this.pausePending = want;
      this.pause.disabled = true;
      setText(this.pause, want ? 'Pausing…' : 'Resuming…');
      callbacks.pause(id, want);
    });
    head.append(this.name, this.status, this.pause, this.cancel);
    this.bar = el(doc, 'div', 'orchestra-bar');
    this.count = el(doc, 'span', 'orchestra-job-count');
    this.stats = el(doc, 'span', 'orchestra-job-stats');
    const line = el(doc, 'div', 'orchestra-job-line');
    this.states = el(doc, 'div', 'orchestra-job-states');
    line.append(this.count, this.stats);
    this.failures = el(doc, 'details', 'orchestra-failures');
    this.failuresSummary = el(doc, 'summary');
    this.failuresList = el(doc, 'ul', 'orchestra-failure-list');
    this.failures.append(this.failuresSummary, this.failuresList);
    this.failures.hidden = true;
    this.failuresList.addEventListener('click', event => {
      const button = (event.target as Element).closest('button[data-item]') as HTMLButtonElement | null;
      if (button) {
        callbacks.traceback(id, Number(button.dataset.item));
      }
    });
    this.traceback = el(doc, 'pre', 'orchestra-traceback');
    this.traceback.hidden = true;
    this.node.append(head, this.bar, line, this.states, this.failures, this.traceback);
  }

  /** The kernel refused a Pause/Resume: show the state as it is again. */
  pauseRefused(): void {
    this.pausePending = null;
    if (this.last) {
      this.updatePause(this.last.job, this.last.pool);
    }
  }

  update(job: Job, pool: PoolInfo | undefined): void {
    this.last = { job, pool };
    const status = jobStatus(job);
    this.node.dataset.status = status;
    this.node.dataset.paused = String(job.paused);
    setText(this.name, `${job.name} #${job.id}`);
    this.name.title = `job ${job.id}: ${job.name}`;
    setText(this.status, status);
    this.cancel.hidden = job.finished;
    this.updatePause(job, pool);
    for (const { state, percent } of barSegments(job.counts, job.total)) {
      let seg = this.segments.get(state);
      if (!seg) {
        seg = el(this.doc, 'span', 'orchestra-seg');
        seg.dataset.state = state;
        this.segments.set(state, seg);
        this.bar.append(seg);
      }
      seg.style.width = `${percent.toFixed(2)}%`;
      seg.title = `${state.toLowerCase()}: ${job.counts[state]}`;
    }
    setText(this.count, `${job.done}/${job.total ?? `${job.read}+`}`);
    const c = job.counts;
    const parts = [formatRate(jobRate(job))];
    if (!job.finished && !job.paused) {
      parts.push(`ETA ${formatDuration(jobEta(job))}`);
    }
    parts.push(`elapsed ${formatDuration(job.elapsed)}`);
    setText(this.stats, parts.join(' · '));
    // the states other than done and waiting, when there are any
    const states = (['RUNNING', 'FAILED', 'RETRYING', 'CANCELLED'] as const)
      .filter(state => c[state] > 0)
      .map(state => `${state.toLowerCase()} ${c[state]}`);
    setText(this.states, states.join(' · '));
    this.updateFailures(job);
  }

  private updatePause(job: Job, pool: PoolInfo | undefined): void {
    this.paused = job.paused;
    if (this.pausePending === job.paused) {
      this.pausePending = null; // the state shows what was asked
    }
    this.pause.hidden = job.finished;
    this.pause.dataset.paused = String(job.paused);
    if (!pool?.can_pause) {
      this.pause.disabled = true;
      setText(this.pause, 'Pause');
      this.pause.title = pool?.pause_reason || 'pausing is not available';
      return;
    }
    if (this.pausePending !== null) {
      return; // "Pausing…" until the kernel's state says so
    }
    this.pause.disabled = false;
    setText(this.pause, job.paused ? 'Resume' : 'Pause');
    this.pause.title = job.paused
      ? 'Resume this job: its waiting tasks start again'
      : 'Pause this job: no new task starts, running ones finish';
  }

  private updateFailures(job: Job): void {
    const key = JSON.stringify([job.counts.FAILED, job.failures]);
    if (key === this.failuresKey) {
      return;
    }
    this.failuresKey = key;
    this.failures.hidden = job.counts.FAILED === 0;
    const shown = job.failures.length;
    const more = job.counts.FAILED - shown;
    setText(
      this.failuresSummary,
      `${job.counts.FAILED} failure${job.counts.FAILED === 1 ? '' : 's'}` + (more > 0 ? ` (first ${shown} listed)` : '')
    );
    this.failuresList.replaceChildren(
      ...job.failures.map(f => {
        const li = el(this.doc, 'li', 'orchestra-failure');
        li.dataset.item = String(f.item);
        const text = el(this.doc, 'span', 'orchestra-failure-text', `item ${f.item}: ${f.type}: ${f.message}`);
        const button = el(this.doc, 'button', 'orchestra-button orchestra-show-traceback', 'Traceback');
        button.dataset.item = String(f.item);
        li.append(text, button);
        return li;
      })
    );
  }
}

class WorkerRow {
  readonly node: HTMLTableRowElement;
  private cells: HTMLTableCellElement[];
  private cpuLine: SVGPolylineElement;
  private memLine: SVGPolylineElement;

  constructor(doc: Document, id: number) {
    this.node = el(doc, 'tr', 'orchestra-worker');
    this.node.dataset.workerId = String(id);
    this.cells = ['pid', 'activity', 'task', 'cpu', 'memory', 'history'].map(name => {
      const td = el(doc, 'td', `orchestra-worker-${name}`);
      this.node.append(td);
      return td;
    });
    const svg = doc.createElementNS(SVG, 'svg');
    svg.setAttribute('class', 'orchestra-sparkline');
    svg.setAttribute('width', String(SPARK_W));
    svg.setAttribute('height', String(SPARK_H));
    svg.setAttribute('viewBox', `0 0 ${SPARK_W} ${SPARK_H}`);
    this.cpuLine = doc.createElementNS(SVG, 'polyline');
    this.cpuLine.setAttribute('class', 'orchestra-spark-cpu');
    this.memLine = doc.createElementNS(SVG, 'polyline');
    this.memLine.setAttribute('class', 'orchestra-spark-memory');
    svg.append(this.memLine, this.cpuLine);
    this.cells[5].append(svg);
  }

  update(w: Worker, history: History | undefined): void {
    const [pid, activity, task, cpu, memory] = this.cells;
    this.node.dataset.activity = w.activity;
    setText(pid, w.pid === null ? '–' : String(w.pid));
    setText(activity, w.stalled ? `${w.activity} (stalled)` : w.activity);
    setText(task, w.job === null ? '' : `#${w.job}[${w.item ?? '?'}]`);
    task.title = w.job === null ? '' : `job ${w.job}, item ${w.item ?? '?'}`;
    setText(cpu, w.cpu_percent === null ? '–' : `${Math.round(w.cpu_percent)}%`);
    setText(memory, formatBytes(w.memory_bytes));
    const cpuPoints = sparklinePoints(history?.cpu ?? [], SPARK_W, SPARK_H, 100);
    const memPoints = sparklinePoints(history?.memory ?? [], SPARK_W, SPARK_H);
    this.cpuLine.setAttribute('points', cpuPoints);
    this.memLine.setAttribute('points', memPoints);
    this.cells[5].title = 'CPU (0–100 %) and memory, recent history';
  }
}

/** One open pool: its line, its resize control, its workers and its jobs. */
class PoolSection {
  readonly node: HTMLElement;
  private title: HTMLElement;
  private badge: HTMLElement;
  private line: HTMLElement;
  private resizeInput: HTMLInputElement;
  private resizeButton: HTMLButtonElement;
  private workersBody: HTMLElement;
  private jobsList: HTMLElement;
  private emptyJobs: HTMLElement;
  private workerRows = new Map<number, WorkerRow>();
  private maxWorkers = 1;
  private resizeDirty = false;

  constructor(
    private doc: Document,
    readonly id: number,
    callbacks: ViewCallbacks
  ) {
    this.node = el(doc, 'section', 'orchestra-pool');
    this.node.dataset.poolId = String(id);
    const head = el(doc, 'h3', 'orchestra-pool-head');
    this.title = el(doc, 'span', 'orchestra-pool-name');
    this.badge = el(doc, 'span', 'orchestra-pool-badge');
    head.append(this.title, this.badge);
    this.line = el(doc, 'div', 'orchestra-pool-line');
    const resize = el(doc, 'div', 'orchestra-resize');
    this.resizeInput = el(doc, 'input', 'orchestra-resize-input');
    this.resizeInput.type = 'number';
    this.resizeInput.min = '1';
    this.resizeInput.setAttribute('aria-label', 'workers');
    this.resizeInput.addEventListener('input', () => (this.resizeDirty = true));
    this.resizeButton = el(doc, 'button', 'orchestra-button orchestra-resize-button', 'Resize');
    const submit = (): void => {
      const n = Number(this.resizeInput.value);
      if (!Number.isInteger(n) || n < 1 || n > this.maxWorkers) {
        callbacks.notice(`workers must be an integer from 1 to ${this.maxWorkers}`, true);
        return;
      }
      this.resizeDirty = false;
      callbacks.resize(id, n, this.maxWorkers);
    };
    this.resizeButton.addEventListener('click', submit);
    this.resizeInput.addEventListener('keydown', e => {
      if (e.key === 'Enter') {
        submit();
      }
    });
    resize.append(el(doc, 'span', undefined, 'workers'), this.resizeInput, this.resizeButton);

    const table = el(doc, 'table', 'orchestra-worker-table');
    const row = el(doc, 'tr');
    for (const title of ['pid', 'state', 'task', 'CPU', 'mem', '']) {
      row.append(el(doc, 'th', undefined, title));
    }
    const thead = el(doc, 'thead');
    thead.append(row);
    this.workersBody = el(doc, 'tbody');
    table.append(thead, this.workersBody);

    this.emptyJobs = el(doc, 'div', 'orchestra-empty', 'No jobs yet');
    this.jobsList = el(doc, 'div', 'orchestra-job-list');
    this.node.append(
      head,
      this.line,
      resize,
      el(doc, 'h4', undefined, 'Workers'),
      table,
      el(doc, 'h4', undefined, 'Jobs'),
      this.emptyJobs,
      this.jobsList
    );
  }

  update(pool: PoolInfo, histories: Map<number, History>, jobNodes: Element[]): void {
    this.node.dataset.poolName = pool.name;
    this.node.dataset.default = String(pool.default);
    setText(this.title, pool.name);
    setText(this.badge, pool.default ? `${pool.backend} · orchestra.map` : pool.backend);
    this.badge.title = pool.default ? 'the default pool: orchestra.map and orchestra.run use it' : '';
    const alive = pool.workers.filter(w => w.state !== 'dead').length;
    setText(
      this.line,
      `${pool.state} · ${alive} of ${pool.target_workers} worker(s) · ${pool.queued} queued`
    );
    this.maxWorkers = pool.max_workers;
    this.resizeInput.max = String(pool.max_workers);
    if (!this.resizeDirty && this.doc.activeElement !== this.resizeInput) {
      this.resizeInput.value = String(pool.target_workers);
    }
    this.resizeInput.disabled = this.resizeButton.disabled = !pool.can_resize;
    this.resizeButton.title = pool.can_resize ? `Change the number of workers of ${pool.name}` : pool.resize_reason;

    const seen = new Set<number>();
    for (const w of pool.workers) {
      seen.add(w.id);
      let row = this.workerRows.get(w.id);
      if (!row) {
        row = new WorkerRow(this.doc, w.id);
        this.workerRows.set(w.id, row);
      }
      row.update(w, w.pid === null ? undefined : histories.get(w.pid));
    }
    prune(this.workerRows, seen);
    const workerNodes = pool.workers.map(w => this.workerRows.get(w.id)!.node);
    if (!sameNodes(this.workersBody, workerNodes)) {
      this.workersBody.replaceChildren(...workerNodes);
    }
    // Move nodes only when the order changed: moving one under the mouse would lose a click.
    if (!sameNodes(this.jobsList, jobNodes)) {
      this.jobsList.replaceChildren(...jobNodes);
    }
    this.emptyJobs.hidden = jobNodes.length > 0;
  }
}

function prune<R extends { node: Element }>(rows: Map<number, R>, keep: Set<number>): void {
  for (const [id, row] of rows) {
    if (!keep.has(id)) {
      row.node.remove();
      rows.delete(id);
    }
  }
}

export class PanelView {
  readonly node: HTMLElement;
  private statusLine: HTMLElement;
  private notice: HTMLElement;
  private poolsList: HTMLElement;
  private noPools: HTMLElement;
  private sections = new Map<number, PoolSection>();
  private jobRows = new Map<number, JobRow>();
  private callbacks: ViewCallbacks;

  constructor(
    private doc: Document,
    callbacks: Omit<ViewCallbacks, 'notice'>
  ) {
    this.callbacks = { ...callbacks, notice: (text, error) => this.showNotice(text, error) };
    this.node = el(doc, 'div', 'orchestra-panel');
    this.statusLine = el(doc, 'div', 'orchestra-status', 'Not connected');
    this.notice = el(doc, 'div', 'orchestra-notice');
    this.notice.hidden = true;
    this.noPools = el(doc, 'div', 'orchestra-empty orchestra-no-pool', 'no pool running (the default pool starts on first use)');
    this.poolsList = el(doc, 'div', 'orchestra-pools');
    this.node.append(this.statusLine, this.notice, this.noPools, this.poolsList);
  }

  setStatus(text: string, connected: boolean): void {
    setText(this.statusLine, text);
    this.node.dataset.connected = String(connected);
  }

  showNotice(text: string, error = false): void {
    this.notice.hidden = text === '';
    this.notice.classList.toggle('orchestra-notice-error', error);
    setText(this.notice, text);
  }

  showTraceback(jobId: number, item: number, exception: string, text: string): void {
    const row = this.jobRows.get(jobId);
    if (!row) {
      return;
    }
    row.traceback.hidden = false;
    row.traceback.dataset.item = String(item);
    row.traceback.textContent = `item ${item}: ${exception}\n\n${text}`;
  }

  /** The kernel refused a Pause/Resume of this job. */
  pauseRefused(jobId: number): void {
    this.jobRows.get(jobId)?.pauseRefused();
  }

  update(state: StateMessage, histories: Map<number, History>): void {
    const pools = new Map(state.pools.map(p => [p.id, p]));
    const seenJobs = new Set<number>();
    const jobsOf = new Map<number, Element[]>();
    for (const job of [...state.jobs].sort((a, b) => b.id - a.id)) {
      const pool = pools.get(job.pool);
      if (!pool) {
        continue; // its pool closed: it goes with it
      }
      seenJobs.add(job.id);
      let row = this.jobRows.get(job.id);
      if (!row) {
        row = new JobRow(this.doc, job.id, this.callbacks);
        this.jobRows.set(job.id, row);
      }
      row.update(job, pool);
      const nodes = jobsOf.get(job.pool) ?? [];
      nodes.push(row.node);
      jobsOf.set(job.pool, nodes);
    }
    prune(this.jobRows, seenJobs);

    const seenPools = new Set<number>();
    for (const pool of state.pools) {
      seenPools.add(pool.id);
      let section = this.sections.get(pool.id);
      if (!section) {
        section = new PoolSection(this.doc, pool.id, this.callbacks);
        this.sections.set(pool.id, section);
      }
      section.update(pool, histories, jobsOf.get(pool.id) ?? []);
    }
    prune(this.sections, seenPools);
    const sectionNodes = state.pools.map(p => this.sections.get(p.id)!.node);
    if (!sameNodes(this.poolsList, sectionNodes)) {
      this.poolsList.replaceChildren(...sectionNodes);
    }
    this.noPools.hidden = state.pools.length > 0;
  }
}
