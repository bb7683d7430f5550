/**
 * A small Kubernetes API server for the faults a real one (scripts/kube-local.sh) cannot be made
 * to produce on demand: a bookmark now, a watch dropped or cut in the middle of an event, a
 * garbled line, refused watches (503), and objects with fields a real one would have pruned.
 * Lists with resourceVersion and paging, watches from a resourceVersion with server-side
 * timeouts, bearer token auth. Everything else is tested against the real API server.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';

export type Obj = Record<string, unknown> & { metadata: { name: string; namespace?: string; resourceVersion?: string; uid?: string; [k: string]: unknown } };

interface Event {
  readonly rv: number;
  readonly type: 'ADDED' | 'MODIFIED' | 'DELETED';
  readonly object: Obj;
}

interface Resource {
  readonly objects: Map<string, Obj>;
  readonly events: Event[];
  readonly watches: Set<ServerResponse>;
}

export interface FakeKubeApi {
  readonly url: string;
  readonly token: string;
  /** Requests by kind: "list /api/v1/services", "watch /api/v1/services". */
  readonly requests: string[];
  put(path: string, object: Obj): void;
  remove(path: string, namespace: string, name: string): void;
  /** A BOOKMARK with the current resourceVersion on every open watch. */
  bookmark(): void;
  /** Drop every open watch connection. */
  dropWatches(): void;
  /** The next event on each open watch is cut in the middle of its line and the connection dropped. */
  cutNextEvent(): void;
  /** Raw bytes on every open watch of a resource (a garbled line). */
  sendRaw(path: string, text: string): void;
  /** While set, new watches are answered 503. */
  refuseWatches(on: boolean): void;
  openWatches(): number;
  close(): Promise<void>;
}

const key = (ns: string | undefined, name: string): string => `${ns ?? ''}/${name}`;

export async function startFakeKubeApi(): Promise<FakeKubeApi> {
  const token = 'test-token-0123456789';
  const resources = new Map<string, Resource>();
  const requests: string[] = [];
  let rv = 1000;
  let cutNext = false;
  let refusing = false;
  const resource = (path: string): Resource => {
    let r = resources.get(path);
    if (!r) {
      r = { objects: new Map(), events: [], watches: new Set() };
      resources.set(path, r);
    }
    return r;
  };
  const eventLine = (type: string, object: unknown): string => `${JSON.stringify({ type, object })}\n`;
  const send = (r: Resource, e: Event): void => {
    const cut = cutNext;
    for (const w of r.watches) {
      const matches = (w as ServerResponse & { matches?: (o: Obj) => boolean }).matches;
      if (matches && !matches(e.object)) continue;
      const line = eventLine(e.type, e.object);
      if (cut) {
        // end(), not destroy(): the half line is flushed to the client before the connection goes.
        w.write(line.slice(0, Math.floor(line.length / 2)), () => w.socket?.end());
        cutNext = false;
        continue;
      }
      w.write(line);
    }
  };
  const record = (path: string, type: Event['type'], object: Obj): void => {
    const r = resource(path);
    rv++;
    const stamped = { ...object, metadata: { ...object.metadata, resourceVersion: String(rv) } } as Obj;
    if (type === 'DELETED') r.objects.delete(key(object.metadata.namespace, object.metadata.name));
    else r.objects.set(key(object.metadata.namespace, object.metadata.name), stamped);
    const e = { rv, type, object: stamped };
    r.events.push(e);
    send(r, e);
  };

  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    if (req.headers.authorization !== `Bearer ${token}`) {
      res.writeHead(401, { 'content-type': 'application/json' }).end(JSON.stringify({ kind: 'Status', code: 401, reason: 'Unauthorized', message: 'no valid token' }));
      return;
    }
    const url = new URL(req.url ?? '/', 'http://x');
    const r = resource(url.pathname);
    const field = url.searchParams.get('fieldSelector');
    const nameIs = field?.startsWith('metadata.name=') ? field.slice('metadata.name='.length) : undefined;
    const matches = (o: Obj): boolean => nameIs === undefined || o.metadata.name === nameIs;
    if (url.searchParams.get('watch') !== 'true') {
      requests.push(`list ${url.pathname}`);
      const all = [...r.objects.entries()].sort(([a], [b]) => (a < b ? -1 : 1)).map(([, o]) => o).filter(matches);
      const limit = Number(url.searchParams.get('limit') ?? all.length);
      const offset = Number(url.searchParams.get('continue') ?? 0);
      const page = all.slice(offset, offset + limit).map(({ apiVersion: _a, kind: _k, ...rest }) => rest);
      const next = offset + limit < all.length ? String(offset + limit) : undefined;
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ kind: 'List', apiVersion: 'v1', metadata: { resourceVersion: String(rv), ...(next ? { continue: next } : {}) }, items: page }));
      return;
    }
    requests.push(`watch ${url.pathname}`);
    if (refusing) {
      res.writeHead(503, { 'content-type': 'application/json' }).end(JSON.stringify({ kind: 'Status', code: 503, reason: 'ServiceUnavailable', message: 'refusing watches (test)' }));
      return;
    }
    const from = Number(url.searchParams.get('resourceVersion') ?? 0);
    res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
    for (const e of r.events) if (e.rv > from && matches(e.object)) res.write(eventLine(e.type, e.object));
    Object.assign(res, { matches });
    r.watches.add(res);
    const timeout = Number(url.searchParams.get('timeoutSeconds') ?? 0);
    const timer = timeout > 0 ? setTimeout(() => res.end(), timeout * 1000) : undefined;
    res.on('close', () => {
      clearTimeout(timer);
      r.watches.delete(res);
    });
  };

  const server: Server = createServer(handle);
  const port = await new Promise<number>((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port)));
  return {
    url: `http://127.0.0.1:${port}`,
    token,
    requests,
    put(path, object) {
      const exists = resource(path).objects.has(key(object.metadata.namespace, object.metadata.name));
      record(path, exists ? 'MODIFIED' : 'ADDED', object);
    },
    remove(path, namespace, name) {
      const o = resource(path).objects.get(key(namespace, name));
      if (o) record(path, 'DELETED', o);
    },
    bookmark() {
      for (const r of resources.values()) for (const w of r.watches) w.write(eventLine('BOOKMARK', { kind: 'Status', apiVersion: 'v1', metadata: { resourceVersion: String(rv) } }));
    },
    dropWatches() {
      for (const r of resources.values()) for (const w of r.watches) w.socket?.destroy();
    },
    cutNextEvent() {
      cutNext = true;
    },
    sendRaw(path, text) {
      for (const w of resource(path).watches) w.write(text);
    },
    refuseWatches(on) {
      refusing = on;
    },
    openWatches() {
      return [...resources.values()].reduce((n, r) => n + r.watches.size, 0);
    },
    close() {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/** A kubeconfig for the fake: plain HTTP (so insecure-skip-tls-verify, as client-node requires for http), bearer token. */
export function kubeconfigFor(api: FakeKubeApi): string {
  return `apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {server: "${api.url}", insecure-skip-tls-verify: true}
users:
- name: test
  user: {token: ${api.token}}
contexts:
- name: fake
  context: {cluster: fake, user: test}
current-context: fake
`;
}
