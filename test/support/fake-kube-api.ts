/**
 * A small Kubernetes API server for tests, the one fake the project allows (no real API server
 * can run on this machine): list with resourceVersion and paging, watch from a resourceVersion
 * with bookmarks and server-side timeouts, history compaction (a watch from before it gets the
 * API server's 410 "too old resource version" ERROR event), bearer token auth, and ways to break
 * watches (drop the connection, cut an event in half, refuse new watches).
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
  /** Forget history up to now: a watch from an older version gets 410. */
  compact(): void;
  /** Drop every open watch connection. */
  dropWatches(): void;
  /** The next event on each open watch is cut in the middle of its line and the connection dropped. */
  cutNextEvent(): void;
  /** Raw bytes on every open watch of a resource (a garbled line). */
  sendRaw(path: string, text: string): void;
  /** What TokenReview says of a token: its ServiceAccount user and the node its pod runs on. */
  /** `audiences`: what the review answers as the token's audiences (default: those asked for). */
  reviewToken(token: string, username: string, node: string | undefined, audiences?: string[]): void;
  /** Answer 404 for this collection, as an API server without the CRD does. */
  notServed(path: string): void;
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
  let compactedTo = 0;
  let cutNext = false;
  let refusing = false;
  const unserved = new Set<string>();
  const reviews = new Map<string, { username: string; node: string | undefined; audiences?: string[] }>();
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
    if (unserved.has(url.pathname)) {
      res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ kind: 'Status', code: 404, reason: 'NotFound', message: 'the server could not find the requested resource' }));
      return;
    }
    if (req.method === 'POST' && url.pathname === '/apis/authentication.k8s.io/v1/tokenreviews') {
      let body = '';
      req.on('data', (d: Buffer) => (body += d.toString()));
      req.on('end', () => {
        const review = JSON.parse(body) as { spec: { token: string; audiences?: string[] } };
        const who = reviews.get(review.spec.token);
        const status = who
          ? { authenticated: true, audiences: who.audiences ?? review.spec.audiences ?? [], user: { username: who.username, extra: who.node ? { 'authentication.kubernetes.io/node-name': [who.node] } : {} } }
          : { authenticated: false, error: 'invalid bearer token' };
        res.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ apiVersion: 'authentication.k8s.io/v1', kind: 'TokenReview', spec: review.spec, status }));
      });
      requests.push('create tokenreviews');
      return;
    }
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
    if (from < compactedTo) {
      res.end(eventLine('ERROR', { kind: 'Status', apiVersion: 'v1', status: 'Failure', code: 410, reason: 'Expired', message: `too old resource version: ${from} (${compactedTo})` }));
      return;
    }
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
    compact() {
      compactedTo = rv + 1;
      for (const r of resources.values()) r.events.length = 0;
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
    reviewToken(token, username, node, audiences) {
      reviews.set(token, { username, node, ...(audiences ? { audiences } : {}) });
    },
    notServed(path) {
      unserved.add(path);
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
