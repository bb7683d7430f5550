/**
 * Puts nodemesh-cni on the node (design.md section 12): the plugin binary into the runtime's CNI
 * bin folder, and an entry for it at the end of the plugins of the node's network configuration
 * (the first conflist by name in the CNI conf folder: the one the runtime uses), so it runs after
 * the network plugin for every pod sandbox. The network plugin's own agent may write its conflist
 * again at any time (and drop our entry): the folder is watched and the entry put back. On stop
 * the entry and the binary are removed, so a node without its agent starts pods again (with
 * fail-closed enrollment the pinned gate still holds their traffic until an agent verifies them).
 */
import { watch, type FSWatcher } from 'node:fs';
import { copyFile, chmod, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

import { logger } from '../shared/log.js';

const log = logger('cni');

export const CNI_PLUGIN = 'nodemesh-cni';

export interface CniInstallOptions {
  /** The node's CNI bin folder (/opt/cni/bin; the DaemonSet mounts it at /host/opt/cni/bin). */
  readonly binDir: string;
  /** The node's CNI conf folder (/etc/cni/net.d). */
  readonly confDir: string;
  /** The plugin binary to install (built into build/cni/). */
  readonly pluginBinary: string;
  /** The agent's enrollment socket as the runtime on the host sees it. */
  readonly enrollSocket: string;
  /** How long the plugin waits for the agent on ADD. */
  readonly timeoutSeconds: number;
  /** Namespaces whose pods the plugin lets start without asking the agent (kube-system). */
  readonly excludeNamespaces: ReadonlyArray<string>;
}

type Json = Record<string, unknown>;

/** The conflist the runtime uses: the first .conflist, .conf or .json by name (libcni's order). */
export async function primaryConfig(confDir: string): Promise<string | undefined> {
  const files = (await readdir(confDir).catch(() => [] as string[])).filter((f) => /\.(conflist|conf|json)$/.test(f)).sort();
  return files[0] === undefined ? undefined : join(confDir, files[0]);
}

/** Writes a file whole: a temporary name the runtime does not read (no CNI extension), then rename. */
async function writeWhole(path: string, text: string, mode = 0o644): Promise<void> {
  const tmp = `${path}.nodemesh-tmp`;
  await writeFile(tmp, text, { mode });
  await rename(tmp, path);
}

export class CniInstaller {
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> = Promise.resolve();
  /** The conflist our entry was put in (removed from it on stop). */
  private installedIn: string | undefined;
  /** What keeps it from being installed (no network config yet, a config it cannot read). */
  problem: string | undefined;

  /** Chained in the node's network config: new pods' starts wait for the agent. */
  get installed(): boolean {
    return this.installedIn !== undefined && this.problem === undefined;
  }

  constructor(private readonly options: CniInstallOptions) {}

  private entry(): Json {
    return { type: CNI_PLUGIN, enrollSocket: this.options.enrollSocket, timeoutSeconds: this.options.timeoutSeconds, excludeNamespaces: [...this.options.excludeNamespaces] };
  }

  /** Installs now, then keeps the entry in the node's network config while it runs. */
  async start(): Promise<void> {
    const target = join(this.options.binDir, CNI_PLUGIN);
    await copyFile(this.options.pluginBinary, `${target}.nodemesh-tmp`);
    await chmod(`${target}.nodemesh-tmp`, 0o755);
    await rename(`${target}.nodemesh-tmp`, target);
    await this.ensure();
    this.watcher = watch(this.options.confDir, () => this.soon());
    this.watcher.on('error', (e) => log.error({ dir: this.options.confDir, err: e.message }, 'the CNI conf folder cannot be watched; checked every 10 s instead'));
    // Events can be missed (a folder replaced): a slow look as well.
    this.timer = setInterval(() => this.soon(), 10_000);
    this.timer.unref();
  }

  private soon(): void {
    this.running = this.running.then(() => this.ensure()).catch((e: unknown) => log.error({ err: (e as Error).message }, 'CNI config check failed'));
  }

  /** Our entry is the last plugin of the primary conflist (a single-plugin .conf becomes a conflist). */
  private async ensure(): Promise<void> {
    const path = await primaryConfig(this.options.confDir);
    if (path === undefined) {
      if (this.problem === undefined) log.warn({ dir: this.options.confDir }, 'no CNI network config on this node yet: nodemesh-cni is added once the network plugin writes one');
      this.problem = `no CNI network config in ${this.options.confDir} yet`;
      return;
    }
    let conf: Json;
    try {
      conf = JSON.parse(await readFile(path, 'utf8')) as Json;
    } catch (e) {
      this.problem = `${path} cannot be read as JSON: ${(e as Error).message}`;
      log.error({ path, err: (e as Error).message }, 'the CNI network config cannot be read: nodemesh-cni is not chained');
      return;
    }
    const list: Json = Array.isArray(conf['plugins']) ? conf : { cniVersion: conf['cniVersion'], name: conf['name'], plugins: [conf] };
    const plugins = (list['plugins'] as Json[]).filter((p) => p['type'] !== CNI_PLUGIN);
    const wanted = { ...list, plugins: [...plugins, this.entry()] };
    const out = path.endsWith('.conflist') ? path : path.replace(/\.(conf|json)$/, '.conflist');
    const text = `${JSON.stringify(wanted, null, 2)}\n`;
    this.problem = undefined;
    if (out === path && JSON.stringify(conf) === JSON.stringify(wanted)) {
      this.installedIn = path;
      return;
    }
    await writeWhole(out, text);
    if (out !== path) await rm(path, { force: true });
    this.installedIn = out;
    log.info({ path: out }, 'nodemesh-cni chained in the node\'s CNI network config');
  }

  /** Removes our entry and the binary; the network config is left as the network plugin wrote it. */
  async stop(): Promise<void> {
    this.watcher?.close();
    clearInterval(this.timer);
    await this.running;
    const path = this.installedIn ?? (await primaryConfig(this.options.confDir));
    if (path !== undefined) {
      try {
        const conf = JSON.parse(await readFile(path, 'utf8')) as Json;
        if (Array.isArray(conf['plugins']) && (conf['plugins'] as Json[]).some((p) => p['type'] === CNI_PLUGIN)) {
          await writeWhole(path, `${JSON.stringify({ ...conf, plugins: (conf['plugins'] as Json[]).filter((p) => p['type'] !== CNI_PLUGIN) }, null, 2)}\n`);
          log.info({ path }, 'nodemesh-cni removed from the node\'s CNI network config');
        }
      } catch (e) {
        log.error({ path, err: (e as Error).message }, 'nodemesh-cni could not be removed from the CNI network config');
      }
    }
    await rm(join(this.options.binDir, CNI_PLUGIN), { force: true });
  }
}
