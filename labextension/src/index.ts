// The "Orchestra" side panel: the pool and jobs of the active notebook's kernel, spoken to over
// one comm (docs/panel.md). It opens the comm only while it is visible, so a closed panel
// costs the kernel nothing; in a kernel without `%load_ext orchestra_nb` the kernel closes
// the comm at once and the panel says what to run.
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel } from '@jupyterlab/services';
import { LabIcon } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { PanelController } from './controller';
import { helloMessage, PanelMessage, TARGET } from './protocol';

export const PANEL_ID = 'orchestra-nb-panel';
export const TOGGLE_COMMAND = 'orchestra-nb:toggle-panel';

const orchestraIcon = new LabIcon({
  name: 'orchestra-nb:icon',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">' +
    '<g class="jp-icon3" fill="#616161">' +
    '<rect x="1" y="9" width="3" height="6" rx="0.5"/><rect x="6.5" y="5" width="3" height="10" rx="0.5"/>' +
    '<rect x="12" y="1" width="3" height="14" rx="0.5"/></g></svg>'
});

const NOT_LOADED = 'orchestra_nb is not loaded in this kernel: run %load_ext orchestra_nb';

export class OrchestraPanel extends Widget {
  readonly controller: PanelController;
  private notebook: NotebookPanel | null = null;
  private kernel: Kernel.IKernelConnection | null = null;
  private comm: Kernel.IComm | null = null;
  private connected = false;

  constructor(tracker: INotebookTracker) {
    super();
    this.id = PANEL_ID;
    this.title.icon = orchestraIcon;
    this.title.caption = 'Orchestra: workers and jobs of this notebook';
    this.addClass('orchestra-panel-widget');
    this.controller = new PanelController(document, message => this.send(message));
    this.node.append(this.controller.view.node);
    tracker.currentChanged.connect((_, panel) => this.follow(panel));
    this.follow(tracker.currentWidget);
  }

  private send(message: PanelMessage): void {
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    this.comm?.send(message as any);
  }

  private follow(panel: NotebookPanel | null): void {
    if (panel === this.notebook) {
      return;
    }
    if (this.notebook) {
      this.notebook.sessionContext.kernelChanged.disconnect(this.onKernelChanged, this);
      this.notebook.sessionContext.statusChanged.disconnect(this.onStatus, this);
    }
    this.notebook = panel;
    if (panel) {
      panel.sessionContext.kernelChanged.connect(this.onKernelChanged, this);
      panel.sessionContext.statusChanged.connect(this.onStatus, this);
    }
    this.setKernel(panel?.sessionContext.session?.kernel ?? null);
  }

  private onKernelChanged(): void {
    this.setKernel(this.notebook?.sessionContext.session?.kernel ?? null);
  }

  private onStatus(_: unknown, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'dead' || status === 'autorestarting') {
      this.dropComm('the kernel is restarting');
    } else if (status === 'idle' && !this.comm) {
      // A cell just ran: it may have been %load_ext orchestra_nb.
      this.openComm();
    }
  }

  private setKernel(kernel: Kernel.IKernelConnection | null): void {
    if (kernel === this.kernel) {
      return;
    }
    this.closeComm();
    this.kernel = kernel;
    this.controller.view.setStatus(kernel ? 'Connecting…' : 'No notebook kernel', false);
    this.openComm();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this.openComm();
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this.closeComm(); // a hidden panel costs the kernel nothing
    this.controller.view.setStatus('Paused while the panel is hidden', false);
  }

  private openComm(): void {
    const kernel = this.kernel;
    if (!this.isVisible || !kernel || this.comm || kernel.isDisposed || kernel.status === 'dead') {
      return;
    }
    let comm: Kernel.IComm;
    try {
      comm = kernel.createComm(TARGET);
    } catch (e) {
      this.controller.view.setStatus(`Cannot talk to the kernel: ${e}`, false);
      return;
    }
    // JupyterLab >= 4.4 may send comm messages over a kernel subshell, one shared by all comms
    // of a target and reference counted: a comm closing while the next one opens (the panel
    // hidden and shown, or refused before %load_ext) can delete the subshell the new comm then
    // uses, and the kernel drops its messages ("Unknown subshell_id"). ipykernel also routes a
    // comm's messages to the shell its kernel side last published from, which for the panel's
    // own thread is the main shell. So the panel talks to the main shell: commands are handled
    // between cells and while a cell awaits. Set before the comm sends anything; JupyterLab
    // without subshells has no such property.
    if ('commsOverSubshells' in comm) {
      (comm as { commsOverSubshells: string }).commsOverSubshells = 'disabled';
    }
    this.comm = comm;
    this.connected = false;
    this.node.dataset.commId = comm.commId; // lets a test tell this panel's traffic apart
    comm.onMsg = msg => {
      if (this.comm !== comm) {
        return;
      }
      const parsed = this.controller.handle(msg.content.data);
      if (parsed?.type === 'state' && !this.connected) {
        this.connected = true;
        this.controller.view.setStatus(`Kernel: ${this.notebook?.title.label ?? ''}`, true);
      }
    };
    comm.onClose = () => {
      if (this.comm === comm) {
        this.dropComm(this.connected ? 'orchestra_nb was unloaded from this kernel' : NOT_LOADED);
      }
    };
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    comm.open(helloMessage() as any);
  }

  private dropComm(why: string): void {
    delete this.node.dataset.commId;
    this.comm = null;
    this.connected = false;
    this.controller.reset();
    this.controller.view.setStatus(why, false);
  }

  private closeComm(): void {
    const comm = this.comm;
    delete this.node.dataset.commId;
    this.comm = null;
    this.connected = false;
    this.controller.reset();
    if (comm && !comm.isDisposed) {
      try {
        comm.close();
      } catch {
        // the kernel is already gone: nothing to close
      }
    }
  }

  dispose(): void {
    this.closeComm();
    super.dispose();
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'orchestra-nb:panel',
  description: 'A side panel with the pool and jobs of the notebook kernel (orchestra_nb).',
  autoStart: true,
  requires: [INotebookTracker],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker) => {
    const panel = new OrchestraPanel(tracker);
    app.shell.add(panel, 'right', { rank: 950 });
    app.commands.addCommand(TOGGLE_COMMAND, {
      label: 'Orchestra Panel',
      caption: 'Show the Orchestra side panel',
      execute: () => app.shell.activateById(PANEL_ID)
    });
  }
};

export default plugin;
