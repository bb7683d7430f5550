/**
 * A plain HTTP/2 (h2c, prior knowledge) server for L7 tests, run as a pod's command:
 * `node h2-app.js <name> <port>`. Every answer says x-served-by: <name>, and once the request's
 * body was read, x-body-sha256 and x-body-bytes of what came.
 *   /fail-first/<key>          503 the first time this key is seen, then 200
 *   /slow-first/<key>/<ms>     the first time, answers after <ms>; then at once
 *   anything else              200
 */
import { createServer } from 'node:http2';

import { readBody } from './app-body.js';

const [name = 'app', portText = '8080'] = process.argv.slice(2);
const seen = new Set<string>();
const first = (key: string): boolean => {
  if (seen.has(key)) return false;
  seen.add(key);
  return true;
};

const server = createServer((req, res) => {
  readBody(req, (sha256, bytes) => {
    const url = req.url;
    const headers = { 'x-served-by': name, 'x-body-sha256': sha256, 'x-body-bytes': String(bytes), 'content-type': 'text/plain' };
    const failFirst = /^\/[^/]*\/?fail-first\/([^/?]+)/.exec(url);
    if (failFirst && first(`fail:${failFirst[1] ?? ''}`)) {
      res.writeHead(503, headers);
      res.end('failing the first time\n');
      return;
    }
    const slowFirst = /slow-first\/([^/?]+)\/(\d+)/.exec(url);
    const delay = slowFirst && first(`slow:${slowFirst[1] ?? ''}`) ? Number(slowFirst[2]) : 0;
    setTimeout(() => {
      if (res.stream.destroyed) return;
      res.writeHead(200, headers);
      res.end(`ok after ${delay} ms\n`);
    }, delay);
  });
});
server.on('sessionError', () => undefined);
server.listen(Number(portText), '0.0.0.0');
process.on('SIGTERM', () => server.close());
