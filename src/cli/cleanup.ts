/**
 * `nodemesh cleanup`: takes nodemesh off this node (the DaemonSet's uninstall runs it). The pins
 * under --bpf-root outlive the agent on purpose (capture holds across a restart), so removing
 * them is a step of its own: links and gate detached, pins and folders removed, the in-pod
 * delivery routing and sysctls of live pods undone (src/datapath/teardown.ts), and the
 * agent's run folder removed. Pods and the runtime's records of them stay: they are the
 * runtime's, not nodemesh's capture state.
 */
import { readdir, rm, rmdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { dirname, join, normalize } from 'node:path';

import { assertPinRoot } from '../datapath/node-datapath.js';
import { emptyReport, teardownNode, type KnownPod, type TeardownReport } from '../datapath/teardown.js';
import { findCgroup2Mount, removeCgroup } from '../runtime/cgroup.js';
import { nodeCgroup, runtimeConfigFromEnv } from '../runtime/config.js';
import { ENROLL_SOCKET, agentAnswers, agentRunDir } from '../runtime/enrollment.js';
import { PodStore } from '../runtime/store.js';
import { NodemeshError } from '../shared/errors.js';
import { logger } from '../shared/log.js';
import { checkRoot } from './preflight.js';
import { table, type OutputFormat } from './output.js';

const log = logger('cleanup');

export interface CleanupOptions {
  /** The node taken off: its pods' routing, its pod cgroup, its agent's run folder. */
  readonly node: string;
  readonly pinRoot: string;
  /** The agent's --run-dir; undefined: nodes/NODE in the runtime's state folder. */
  readonly runDir?: string;
  readonly force: boolean;
}

export async function cleanup(options: CleanupOptions): Promise<TeardownReport> {
  checkRoot();
  const runtime = runtimeConfigFromEnv();
  const { stateDir } = runtime;
  const runDir = options.runDir ?? agentRunDir(stateDir, options.node);
  const socketPath = join(runDir, ENROLL_SOCKET);
  if (await agentAnswers(socketPath)) {
    if (!options.force) {
      throw new NodemeshError('NM_ERR_AGENT_RUNNING', `an agent serves this node (its enrollment socket ${socketPath} answers): cleanup would take capture away from it`, {
        context: { path: socketPath },
        hint: 'stop the agent first, or run `nodemesh cleanup --force` to remove its capture anyway (it keeps running without it)',
      });
    }
    log.warn({ path: socketPath }, 'an agent is running: --force takes its capture away; stop it too');
  }

  // Local pods' netns, by uid. A Kubernetes node has no records: teardownNode finds the netns of
  // pinned pods from their links there. A state folder that cannot be read is the same case.
  const known: KnownPod[] = [];
  try {
    const { records, errors } = await new PodStore(stateDir).scan();
    for (const e of errors) log.warn({ err: e }, 'pod record skipped');
    for (const r of records.filter((p) => p.node === options.node)) known.push({ uid: r.uid, name: `${r.namespace}/${r.name}`, netnsPath: r.netnsPath });
  } catch (e) {
    log.warn({ err: e }, "the runtime's pod records cannot be read: pods are found from their links only");
  }

  const report = await teardownNode(options.pinRoot, known, emptyReport());

  if (existsSync(runDir)) {
    try {
      await rm(runDir, { recursive: true, force: true });
      report.removed.push({ kind: 'run dir', what: runDir });
    } catch (e) {
      report.failed.push({
        kind: 'run dir',
        what: runDir,
        error: new NodemeshError('NM_ERR_STATE', `the agent's run folder ${runDir} cannot be removed: ${(e as Error).message}`, { context: { path: runDir }, cause: e }),
      });
    }
    // The runtime removes its state folder when its last pod goes; with no pod left, the agent's
    // folder (and nodes/ above it) was what kept it. rmdir leaves each if anything else is there.
    if (options.runDir === undefined) {
      await rmdir(dirname(runDir)).catch(() => undefined);
      await rmdir(dirname(dirname(runDir))).catch(() => undefined);
    }
  }
  // The node's pod cgroup outlives its pods (the gate sat on it); with the gate gone and no pod
  // left in it, it goes, and the runtime's cgroup folders above it when they are empty.
  const podsCgroup = nodeCgroup(await findCgroup2Mount(), runtime, options.node);
  // While pods of the node run, it is theirs (the runtime's) and stays, as they do.
  const podsLeft = existsSync(podsCgroup) ? (await readdir(podsCgroup, { withFileTypes: true })).filter((d) => d.isDirectory()).length : 0;
  if (podsLeft === 0 && existsSync(podsCgroup)) {
    try {
      await removeCgroup(podsCgroup, dirname(dirname(dirname(podsCgroup))));
      report.removed.push({ kind: 'cgroup', what: podsCgroup });
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EBUSY' || code === 'ENOTEMPTY') report.left.push({ kind: 'cgroup', what: podsCgroup, reason: 'pods of the node still run in it' });
      else report.failed.push({ kind: 'cgroup', what: podsCgroup, error: new NodemeshError('NM_ERR_STATE', `the node's pod cgroup ${podsCgroup} cannot be removed: ${(e as Error).message}`, { context: { path: podsCgroup }, cause: e }) });
    }
  }
  return report;
}

export function formatCleanup(report: TeardownReport, format: OutputFormat): { stdout: string; stderr: string } {
  let stderr = report.left.map((l) => `note: ${l.kind} ${l.what} left in place: ${l.reason}\n`).join('');
  if (format === 'json') {
    const json = { removed: report.removed, left: report.left, failed: report.failed.map((f) => ({ kind: f.kind, what: f.what, error: f.error.toJSON() })) };
    return { stdout: JSON.stringify(json, null, 2) + '\n', stderr };
  }
  if (report.failed.length > 0) stderr += table(['KIND', 'WHAT', 'NOT REMOVED'], report.failed.map((f) => [f.kind, f.what, f.error.message]));
  const stdout = report.removed.length === 0 ? 'nothing to remove\n' : table(['KIND', 'WHAT'], report.removed.map((r) => [r.kind, r.what]));
  return { stdout, stderr };
}

/** The command: checks its options, cleans up, prints the report, and fails if anything could not be removed. */
export async function cleanupCommand(opts: { node: string; bpfRoot: string; runDir?: string; force: boolean }, format: OutputFormat, out: (text: string) => void): Promise<void> {
  // "/sys/fs/bpf/" would be the whole bpffs: normalised, it is refused as not under it.
  const pinRoot = normalize(opts.bpfRoot).replace(/(.)\/+$/, '$1');
  assertPinRoot(pinRoot);
  const report = await cleanup({ node: opts.node, pinRoot, force: opts.force, ...(opts.runDir === undefined ? {} : { runDir: opts.runDir }) });
  const printed = formatCleanup(report, format);
  out(printed.stdout);
  process.stderr.write(printed.stderr);
  const failure = cleanupFailure(report);
  if (failure) throw failure;
}

/** After the report is printed: the cleanup failed if anything could not be removed. */
function cleanupFailure(report: TeardownReport): NodemeshError | undefined {
  const first = report.failed[0];
  if (!first) return undefined;
  return new NodemeshError(first.error.code, `cleanup could not remove ${report.failed.length} of the things it found; first: ${first.kind} ${first.what}: ${first.error.message}`, {
    context: first.error.context,
    cause: first.error,
    hint: 'fix the cause and run `nodemesh cleanup` again: it removes what is left',
  });
}
