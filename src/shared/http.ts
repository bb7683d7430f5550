/** Small HTTP endpoints: the agent's metrics (15020), readiness (15021) and admin (15000), the control plane's 15014. */
import { chmod, rm } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';

import { listenError } from './ports.js';

export interface HostPort {
  readonly host: string;
  readonly port: number;
}

export type Routes = Readonly<Record<string, (req: IncomingMessage) => Promise<{ status: number; type: string; body: string }>>>;

/**
 * Serves `routes` on `at`. `field` is the option that gave the address (metrics, ready, admin,
 * http): a port that is taken or an address that is not this machine's fails with a
 * NodemeshError naming both, not with node's bare EADDRINUSE.
 */
export async function serveHttp(at: HostPort, routes: Routes, field?: string): Promise<Server> {
  const server = routesServer(routes);
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(listenError(e, at, field)));
    server.listen(at.port, at.host, () => resolve());
  });
  return server;
}

/** Serves `routes` on a Unix socket at `path` (made anew, root only). */
export async function serveHttpUnix(path: string, routes: Routes): Promise<Server> {
  const server = routesServer(routes);
  await listenUnix(server, path);
  return server;
}

/** Listens on a Unix socket at `path`, made anew (a file left there by a process that died goes) and root only. */
export async function listenUnix(server: Server, path: string): Promise<void> {
  await rm(path, { force: true });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  await chmod(path, 0o600);
}

function routesServer(routes: Routes): Server {
  return createServer((req: IncomingMessage, res: ServerResponse) => {
    const path = (req.url ?? '/').split('?')[0] ?? '/';
    const route = routes[path];
    if (!route || req.method !== 'GET') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end(`no such endpoint: ${req.method} ${path}\n`);
      return;
    }
    route(req).then(
      (r) => res.writeHead(r.status, { 'content-type': r.type }).end(r.body),
      (e: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${(e as Error).message}\n`),
    );
  });
}

export function json(value: unknown, status = 200): { status: number; type: string; body: string } {
  return { status, type: 'application/json', body: JSON.stringify(value, null, 2) + '\n' };
}

export function parseHostPort(text: string, field: string, onError: (message: string) => Error): HostPort {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text);
  const port = Number(m?.[3]);
  if (!m || !Number.isInteger(port) || port < 0 || port > 65535) throw onError(`--${field} "${text}" is not HOST:PORT`);
  return { host: m[1] ?? m[2] ?? '', port };
}
