// Numbers shown by the panel: durations, sizes, rates, ETAs, and the bar's segments.
import { Counts, Job, TaskState } from './protocol';

export function formatDuration(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) {
    return '–';
  }
  if (seconds < 10) {
    return `${seconds.toFixed(1)} s`;
  }
  if (seconds < 60) {
    return `${Math.round(seconds)} s`;
  }
  const total = Math.floor(seconds);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
}

export function formatBytes(bytes: number | null): string {
  if (bytes === null) {
    return '–';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value >= 100 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

export function formatRate(perSecond: number | null): string {
  if (perSecond === null) {
    return '–';
  }
  if (perSecond >= 100) {
    return `${Math.round(perSecond).toLocaleString('en-US')}/s`;
  }
  return perSecond >= 1 ? `${perSecond.toFixed(1)}/s` : `${perSecond.toFixed(2)}/s`;
}

/** Items finished per second since the job started (null before anything is known). */
export function jobRate(job: Job): number | null {
  if (job.elapsed === null || job.elapsed <= 0 || job.done === 0) {
    return null;
  }
  return job.done / job.elapsed;
}

/** Seconds left at the job's average rate; null when unknown, paused or over. */
export function jobEta(job: Job): number | null {
  const rate = jobRate(job);
  if (job.finished || job.paused || rate === null || job.total === null) {
    return null;
  }
  return Math.max(0, job.total - job.done) / rate;
}

export type JobStatus = 'running' | 'paused' | 'cancelled' | 'failed' | 'done';

export function jobStatus(job: Job): JobStatus {
  if (!job.finished) {
    return job.paused ? 'paused' : 'running';
  }
  if (job.cancelled) {
    return 'cancelled';
  }
  return job.counts.FAILED > 0 ? 'failed' : 'done';
}

/** The bar's parts, in drawing order; what is left of the width is work not started yet. */
export const BAR_STATES: TaskState[] = ['SUCCEEDED', 'FAILED', 'CANCELLED', 'RETRYING', 'RUNNING'];

export function barSegments(counts: Counts, total: number | null): { state: TaskState; percent: number }[] {
  const known = BAR_STATES.reduce((sum, s) => sum + counts[s], 0) + counts.PENDING + counts.SCHEDULED;
  const whole = Math.max(total ?? known, known, 1);
  return BAR_STATES.map(state => ({ state, percent: (100 * counts[state]) / whole }));
}

/** An SVG polyline's points for `values` (0..max) in a width x height box. */
export function sparklinePoints(values: number[], width: number, height: number, max?: number): string {
  if (values.length === 0) {
    return '';
  }
  const top = Math.max(max ?? Math.max(...values), 1e-9);
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  return values
    .map((v, i) => {
      const y = height - (Math.min(Math.max(v, 0), top) / top) * height;
      return `${(i * step).toFixed(1)},${y.toFixed(1)}`;
    })
    .join(' ');
}
