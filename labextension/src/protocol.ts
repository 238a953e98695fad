// The panel's messages (docs/panel.md): what the kernel sends is checked here before anything
// renders it, and what the panel sends is built (and checked) here. No JupyterLab imports.

export const TARGET = 'orchestra_nb.panel';
export const PROTOCOL_VERSION = 2;

export const TASK_STATES = [
  'PENDING',
  'RUNNING',
  'SUCCEEDED',
  'FAILED',
  'RETRYING',
  'CANCELLED',
  'SCHEDULED'
] as const;
export type TaskState = (typeof TASK_STATES)[number];
export type Counts = Record<TaskState, number>;

export interface Failure {
  item: number;
  type: string;
  message: string;
}

export interface Job {
  id: number;
  /** the id of the pool it runs on (a PoolInfo's id) */
  pool: number;
  name: string;
  total: number | null;
  read: number;
  counts: Counts;
  done: number;
  elapsed: number | null;
  finished: boolean;
  cancelled: boolean;
  paused: boolean;
  failures: Failure[];
}

export interface Worker {
  id: number;
  pid: number | null;
  state: string;
  activity: string;
  job: number | null;
  item: number | null;
  tasks_done: number;
  cpu_percent: number | null;
  memory_bytes: number | null;
  stalled: boolean;
}

export interface PoolInfo {
  id: number;
  name: string;
  /** the pool `orchestra.map` uses */
  default: boolean;
  backend: string;
  state: string;
  target_workers: number;
  queued: number;
  can_pause: boolean;
  pause_reason: string;
  can_resize: boolean;
  resize_reason: string;
  max_workers: number;
  workers: Worker[];
}

export interface StateMessage {
  type: 'state';
  version: number;
  seq: number;
  /** every open pool of the kernel, the default one first */
  pools: PoolInfo[];
  /** every job shown, newest first, each naming its pool */
  jobs: Job[];
}

export interface ResultMessage {
  type: 'result';
  request: string;
  ok: boolean;
  message: string;
  job_id?: number;
  pool?: number;
  paused?: boolean;
}

export interface TracebackMessage {
  type: 'traceback';
  job_id: number;
  item: number;
  exception: string;
  text: string;
}

export interface ErrorMessage {
  type: 'error';
  message: string;
}

export type KernelMessage = StateMessage | ResultMessage | TracebackMessage | ErrorMessage;

export type PanelMessage =
  | { type: 'hello'; version: number }
  | { type: 'cancel'; job_id: number }
  | { type: 'pause'; job_id: number; paused: boolean }
  | { type: 'resize'; pool: number; workers: number }
  | { type: 'traceback'; job_id: number; item: number }
  | { type: 'ack'; seq: number };

/** A kernel message that does not follow docs/panel.md; `path` names the culprit. */
export class ProtocolError extends Error {
  constructor(
    readonly path: string,
    problem: string
  ) {
    super(`orchestra panel message: ${path} ${problem}`);
    this.name = 'ProtocolError';
  }
}

type Obj = Record<string, unknown>;

function describe(value: unknown): string {
  const text = JSON.stringify(value);
  return text === undefined ? String(value) : text.length > 60 ? text.slice(0, 59) + '…' : text;
}

function object(value: unknown, path: string): Obj {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new ProtocolError(path, `must be an object, got ${describe(value)}`);
  }
  return value as Obj;
}

function int(o: Obj, key: string, path: string, min = 0): number {
  const v = o[key];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min) {
    throw new ProtocolError(`${path}.${key}`, `must be an integer >= ${min}, got ${describe(v)}`);
  }
  return v;
}

function intOrNull(o: Obj, key: string, path: string): number | null {
  return o[key] === null ? null : int(o, key, path);
}

function num(o: Obj, key: string, path: string): number {
  const v = o[key];
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
    throw new ProtocolError(`${path}.${key}`, `must be a number >= 0, got ${describe(v)}`);
  }
  return v;
}

function numOrNull(o: Obj, key: string, path: string): number | null {
  return o[key] === null || o[key] === undefined ? null : num(o, key, path);
}

function str(o: Obj, key: string, path: string): string {
  const v = o[key];
  if (typeof v !== 'string') {
    throw new ProtocolError(`${path}.${key}`, `must be a string, got ${describe(v)}`);
  }
  return v;
}

function bool(o: Obj, key: string, path: string): boolean {
  const v = o[key];
  if (typeof v !== 'boolean') {
    throw new ProtocolError(`${path}.${key}`, `must be true or false, got ${describe(v)}`);
  }
  return v;
}

function array(o: Obj, key: string, path: string): unknown[] {
  const v = o[key];
  if (!Array.isArray(v)) {
    throw new ProtocolError(`${path}.${key}`, `must be a list, got ${describe(v)}`);
  }
  return v;
}

function parseCounts(value: unknown, path: string): Counts {
  const o = object(value, path);
  const counts = {} as Counts;
  for (const state of TASK_STATES) {
    counts[state] = int(o, state, path);
  }
  return counts;
}

function parseJob(value: unknown, path: string): Job {
  const o = object(value, path);
  return {
    id: int(o, 'id', path),
    pool: int(o, 'pool', path, 1),
    name: str(o, 'name', path),
    total: intOrNull(o, 'total', path),
    read: int(o, 'read', path),
    counts: parseCounts(o.counts, `${path}.counts`),
    done: int(o, 'done', path),
    elapsed: numOrNull(o, 'elapsed', path),
    finished: bool(o, 'finished', path),
    cancelled: bool(o, 'cancelled', path),
    paused: bool(o, 'paused', path),
    failures: array(o, 'failures', path).map((f, i) => {
      const p = `${path}.failures[${i}]`;
      const fo = object(f, p);
      return { item: int(fo, 'item', p), type: str(fo, 'type', p), message: str(fo, 'message', p) };
    })
  };
}

function parseWorker(value: unknown, path: string): Worker {
  const o = object(value, path);
  return {
    id: int(o, 'id', path),
    pid: intOrNull(o, 'pid', path),
    state: str(o, 'state', path),
    activity: str(o, 'activity', path),
    job: intOrNull(o, 'job', path),
    item: intOrNull(o, 'item', path),
    tasks_done: int(o, 'tasks_done', path),
    cpu_percent: numOrNull(o, 'cpu_percent', path),
    memory_bytes: numOrNull(o, 'memory_bytes', path),
    stalled: bool(o, 'stalled', path)
  };
}

function parsePool(value: unknown, path: string): PoolInfo {
  const o = object(value, path);
  return {
    id: int(o, 'id', path, 1),
    name: str(o, 'name', path),
    default: bool(o, 'default', path),
    backend: str(o, 'backend', path),
    state: str(o, 'state', path),
    target_workers: int(o, 'target_workers', path),
    queued: int(o, 'queued', path),
    can_pause: bool(o, 'can_pause', path),
    pause_reason: str(o, 'pause_reason', path),
    can_resize: bool(o, 'can_resize', path),
    resize_reason: str(o, 'resize_reason', path),
    max_workers: int(o, 'max_workers', path, 1),
    workers: array(o, 'workers', path).map((w, i) => parseWorker(w, `${path}.workers[${i}]`))
  };
}

/** Check a message from the kernel; throws ProtocolError naming the first bad field. */
export function parseKernelMessage(data: unknown): KernelMessage {
  const o = object(data, 'message');
  const type = o.type;
  switch (type) {
    case 'state': {
      const version = int(o, 'version', 'state');
      if (version !== PROTOCOL_VERSION) {
        throw new ProtocolError('state.version', `is ${version}, this panel speaks ${PROTOCOL_VERSION}`);
      }
      return {
        type,
        version,
        seq: int(o, 'seq', 'state', 1),
        pools: array(o, 'pools', 'state').map((p, i) => parsePool(p, `state.pools[${i}]`)),
        jobs: array(o, 'jobs', 'state').map((j, i) => parseJob(j, `state.jobs[${i}]`))
      };
    }
    case 'result': {
      const msg: ResultMessage = {
        type,
        request: str(o, 'request', 'result'),
        ok: bool(o, 'ok', 'result'),
        message: str(o, 'message', 'result')
      };
      if (o.job_id !== undefined) {
        msg.job_id = int(o, 'job_id', 'result');
      }
      if (o.pool !== undefined) {
        msg.pool = int(o, 'pool', 'result');
      }
      if (o.paused !== undefined) {
        msg.paused = bool(o, 'paused', 'result');
      }
      return msg;
    }
    case 'traceback':
      return {
        type,
        job_id: int(o, 'job_id', 'traceback'),
        item: int(o, 'item', 'traceback'),
        exception: str(o, 'exception', 'traceback'),
        text: str(o, 'text', 'traceback')
      };
    case 'error':
      return { type, message: str(o, 'message', 'error') };
    default:
      throw new ProtocolError('message.type', `is unknown: ${describe(type)}`);
  }
}

function checkInt(value: number, what: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`${what} must be an integer from ${min} to ${max}, got ${value}`);
  }
  return value;
}

export function helloMessage(): PanelMessage {
  return { type: 'hello', version: PROTOCOL_VERSION };
}

export function cancelMessage(jobId: number): PanelMessage {
  return { type: 'cancel', job_id: checkInt(jobId, 'job_id', 0) };
}

export function pauseMessage(jobId: number, paused: boolean): PanelMessage {
  if (typeof paused !== 'boolean') {
    throw new TypeError(`paused must be true or false, got ${describe(paused)}`);
  }
  return { type: 'pause', job_id: checkInt(jobId, 'job_id', 0), paused };
}

export function resizeMessage(poolId: number, workers: number, maxWorkers: number): PanelMessage {
  return { type: 'resize', pool: checkInt(poolId, 'pool', 1), workers: checkInt(workers, 'workers', 1, maxWorkers) };
}

export function tracebackMessage(jobId: number, item: number): PanelMessage {
  return { type: 'traceback', job_id: checkInt(jobId, 'job_id', 0), item: checkInt(item, 'item', 0) };
}

export function ackMessage(seq: number): PanelMessage {
  return { type: 'ack', seq: checkInt(seq, 'seq', 0) };
}
