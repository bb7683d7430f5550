/** Waiting for a TCP listener to come up (pod start-up, readiness of test servers). */
import { readFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

/** Whether a connection opens within timeoutMs (a lost SYN would otherwise be retried for minutes). */
export function canConnect(host: string, port: number, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host, port, timeout: timeoutMs });
    s.once('timeout', () => {
      s.destroy();
      resolve(false);
    });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export async function waitForListener(host: string, port: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await canConnect(host, port))) {
    if (Date.now() > deadline) throw new Error(`nothing listens on ${host}:${port} after ${timeoutMs} ms`);
    await sleep(25);
  }
}

/**
 * Waits until a socket listens on `port` in the network namespace of process `pid`, read from its
 * /proc/PID/net/tcp{,6}: nothing is dialled, so a pod the mesh already serves (whose inbound
 * connections its node's proxy takes, and counts) sees no connection from the host.
 */
export async function waitForPodListener(pid: number | null, port: number, timeoutMs: number): Promise<void> {
  if (pid === null) throw new Error('the pod has no process');
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  // A row's local address ends in :PORT and its state is 0A (LISTEN).
  const listening = (table: string): boolean =>
    table.split('\n').some((row) => {
      const cols = row.trim().split(/\s+/);
      return cols[1]?.endsWith(`:${hexPort}`) === true && cols[3] === '0A';
    });
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const tables = await Promise.all(['tcp', 'tcp6'].map((f) => readFile(`/proc/${pid}/net/${f}`, 'utf8').catch(() => '')));
    if (tables.some(listening)) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on port ${port} in the netns of pid ${pid} after ${timeoutMs} ms`);
    await sleep(25);
  }
}
