// What the panel does with each kernel message, and what it sends back. No JupyterLab imports:
// `send` is the comm's send in the extension, a recorder in the unit tests.
import {
  ackMessage,
  cancelMessage,
  KernelMessage,
  PanelMessage,
  parseKernelMessage,
  pauseMessage,
  ProtocolError,
  resizeMessage,
  StateMessage,
  tracebackMessage
} from './protocol';
import { History, PanelView } from './view';

export const HISTORY_LENGTH = 60;
/** The panel acknowledges states at most this often (the kernel slows down for a silent panel). */
export const ACK_INTERVAL_MS = 2000;

export class PanelController {
  readonly view: PanelView;
  readonly histories = new Map<number, History>();
  lastState: StateMessage | null = null;
  private lastAck = -Infinity;

  constructor(
    doc: Document,
    private send: (message: PanelMessage) => void,
    private now: () => number = () => Date.now()
  ) {
    this.view = new PanelView(doc, {
      cancel: jobId => this.send(cancelMessage(jobId)),
      pause: (jobId, paused) => this.send(pauseMessage(jobId, paused)),
      resize: (poolId, workers, maxWorkers) => {
        this.send(resizeMessage(poolId, workers, maxWorkers));
        const name = this.lastState?.pools.find(p => p.id === poolId)?.name ?? `pool ${poolId}`;
        this.view.showNotice(`resizing ${name} to ${workers} worker(s)…`);
      },
      traceback: (jobId, item) => this.send(tracebackMessage(jobId, item))
    });
  }

  /** One comm message from the kernel (its `content.data`). Returns the parsed message, or
   * null if it was malformed (the panel then shows what was wrong). */
  handle(data: unknown): KernelMessage | null {
    let message: KernelMessage;
    try {
      message = parseKernelMessage(data);
    } catch (e) {
      if (e instanceof ProtocolError) {
        this.view.showNotice(e.message, true);
        return null;
      }
      throw e;
    }
    switch (message.type) {
      case 'state':
        this.onState(message);
        break;
      case 'result':
        this.view.showNotice(message.message, !message.ok);
        if (message.request === 'pause' && !message.ok && message.job_id !== undefined) {
          this.view.pauseRefused(message.job_id);
        }
        break;
      case 'traceback':
        this.view.showTraceback(message.job_id, message.item, message.exception, message.text);
        break;
      case 'error':
        this.view.showNotice(`kernel: ${message.message}`, true);
        break;
    }
    return message;
  }

  /** The comm is gone (panel hidden, kernel restarted, extension unloaded). */
  reset(): void {
    this.lastState = null;
    this.histories.clear();
    this.lastAck = -Infinity;
  }

  private onState(state: StateMessage): void {
    this.lastState = state;
    const alive = new Set<number>();
    for (const w of state.pools.flatMap(p => p.workers)) {
      if (w.pid === null) {
        continue;
      }
      alive.add(w.pid);
      let h = this.histories.get(w.pid);
      if (!h) {
        h = { cpu: [], memory: [] };
        this.histories.set(w.pid, h);
      }
      push(h.cpu, w.cpu_percent ?? 0);
      push(h.memory, w.memory_bytes ?? 0);
    }
    for (const pid of [...this.histories.keys()]) {
      if (!alive.has(pid)) {
        this.histories.delete(pid);
      }
    }
    this.view.update(state, this.histories);
    const now = this.now();
    if (now - this.lastAck >= ACK_INTERVAL_MS) {
      this.lastAck = now;
      this.send(ackMessage(state.seq));
    }
  }
}

function push(values: number[], value: number): void {
  values.push(value);
  if (values.length > HISTORY_LENGTH) {
    values.splice(0, values.length - HISTORY_LENGTH);
  }
}
