/**
 * Gateway API HTTPRoute filters, as the node proxy applies them on the source side:
 * RequestHeaderModifier and ResponseHeaderModifier (on a rule or a backendRef), URLRewrite,
 * RequestRedirect and RequestMirror (on a rule). ExtensionRef and CORS are refused with the field.
 */
import { HEADER_NAME, ObjectInvalid, list, object, only } from './fields.js';

/** Header changes in order: remove (remove and set names), then set, then add; names in lower case. */
export interface HeaderChanges {
  readonly set: ReadonlyArray<readonly [string, string]>;
  readonly add: ReadonlyArray<readonly [string, string]>;
  readonly remove: ReadonlyArray<string>;
}

export interface PathModifier {
  readonly type: 'ReplaceFullPath' | 'ReplacePrefixMatch';
  readonly value: string;
}

export interface MirrorRef {
  readonly namespace: string;
  readonly name: string;
  readonly port: number;
}

export type RouteFilter =
  | { readonly type: 'RequestHeaderModifier'; readonly headers: HeaderChanges }
  | { readonly type: 'ResponseHeaderModifier'; readonly headers: HeaderChanges }
  | { readonly type: 'URLRewrite'; readonly hostname?: string; readonly path?: PathModifier }
  | { readonly type: 'RequestRedirect'; readonly scheme?: 'http' | 'https'; readonly hostname?: string; readonly path?: PathModifier; readonly port?: number; readonly statusCode: number }
  | { readonly type: 'RequestMirror'; readonly backend: MirrorRef; readonly percent: number };

export type FilterType = RouteFilter['type'];

/** A header value: visible ASCII, spaces and tabs inside, nothing that ends a line. */
const FIELD_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/;
const HOSTNAME = /^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const REDIRECT_CODES = [301, 302, 303, 307, 308];
const FIELD_OF: Record<FilterType, string> = {
  RequestHeaderModifier: 'requestHeaderModifier',
  ResponseHeaderModifier: 'responseHeaderModifier',
  URLRewrite: 'urlRewrite',
  RequestRedirect: 'requestRedirect',
  RequestMirror: 'requestMirror',
};

function text(v: unknown, field: string, max = 4096): string {
  if (typeof v !== 'string' || v.length > max) throw new ObjectInvalid(field, `${field} must be a string of at most ${max} characters`);
  return v;
}

function headerName(v: unknown, field: string): string {
  const n = text(v, field, 256);
  if (!HEADER_NAME.test(n)) throw new ObjectInvalid(field, `${field} "${n}" is not a valid header name`);
  // The proxy's own framing is not the route's to change.
  if (['host', 'content-length', 'transfer-encoding', 'connection', 'upgrade', 'te', 'keep-alive'].includes(n.toLowerCase()) || n.startsWith(':')) throw new ObjectInvalid(field, `${field} "${n}" frames the message and cannot be modified (URLRewrite changes the host)`);
  return n.toLowerCase();
}

function headerChanges(v: unknown, at: string): HeaderChanges {
  const o = object(v, at);
  only(o, ['set', 'add', 'remove'], `${at}.`);
  const pairs = (key: 'set' | 'add'): Array<readonly [string, string]> =>
    list(o[key], `${at}.${key}`, 16).map((h, i) => {
      const f = `${at}.${key}[${i}]`;
      const e = object(h, f);
      only(e, ['name', 'value'], `${f}.`);
      const value = text(e['value'], `${f}.value`);
      if (!FIELD_VALUE.test(value)) throw new ObjectInvalid(`${f}.value`, `${f}.value must not hold control characters (no line breaks)`);
      return [headerName(e['name'], `${f}.name`), value] as const;
    });
  const set = pairs('set');
  const add = pairs('add');
  const remove = list(o['remove'], `${at}.remove`, 16).map((n, i) => headerName(n, `${at}.remove[${i}]`));
  const names = [...set.map(([n]) => n), ...remove];
  const twice = names.find((n, i) => names.indexOf(n) !== i);
  if (twice) throw new ObjectInvalid(at, `${at}: header "${twice}" is set or removed twice`);
  if (set.length + add.length + remove.length === 0) throw new ObjectInvalid(at, `${at} changes nothing`);
  return { set, add, remove };
}

function pathModifier(v: unknown, at: string): PathModifier | undefined {
  if (v === undefined) return undefined;
  const o = object(v, at);
  only(o, ['type', 'replaceFullPath', 'replacePrefixMatch'], `${at}.`);
  const type = o['type'];
  if (type !== 'ReplaceFullPath' && type !== 'ReplacePrefixMatch') throw new ObjectInvalid(`${at}.type`, `${at}.type must be ReplaceFullPath or ReplacePrefixMatch`);
  const key = type === 'ReplaceFullPath' ? 'replaceFullPath' : 'replacePrefixMatch';
  const other = type === 'ReplaceFullPath' ? 'replacePrefixMatch' : 'replaceFullPath';
  if (o[other] !== undefined) throw new ObjectInvalid(`${at}.${other}`, `${at}.${other} does not go with type ${type}`);
  const value = text(o[key], `${at}.${key}`, 1024);
  if (!value.startsWith('/') || /[?#\s]/.test(value)) throw new ObjectInvalid(`${at}.${key}`, `${at}.${key} "${value}" must be a path starting with "/" (no "?", "#" or spaces)`);
  return { type, value };
}

function hostname(v: unknown, field: string): string | undefined {
  if (v === undefined) return undefined;
  const h = text(v, field, 253);
  if (!HOSTNAME.test(h) || h.startsWith('*')) throw new ObjectInvalid(field, `${field} "${h}" is not a hostname`);
  return h;
}

/**
 * The filters of a rule (`where` 'rule') or of one backendRef ('backend': header modifiers only).
 * `sameNamespace` and `serviceName` are the route's own checks for references.
 */
export function parseFilters(
  v: unknown,
  at: string,
  where: 'rule' | 'backend',
  refs: { readonly namespace: (v: unknown, field: string) => string; readonly name: (v: unknown, field: string) => string },
): RouteFilter[] {
  const filters = list(v, at, 16).map((f, i): RouteFilter => {
    const fat = `${at}[${i}]`;
    const o = object(f, fat);
    const type = o['type'];
    if (type === 'ExtensionRef' || type === 'CORS') throw new ObjectInvalid(`${fat}.type`, `${fat}.type ${type} is not supported by nodemesh`);
    if (typeof type !== 'string' || !(type in FIELD_OF)) throw new ObjectInvalid(`${fat}.type`, `${fat}.type must be one of ${Object.keys(FIELD_OF).join(', ')}`);
    const t = type as FilterType;
    const field = FIELD_OF[t];
    only(o, ['type', field], `${fat}.`);
    if (where === 'backend' && t !== 'RequestHeaderModifier' && t !== 'ResponseHeaderModifier') throw new ObjectInvalid(`${fat}.type`, `${fat}.type ${t} is not applied per backend (put it on the rule)`);
    const body = o[field];
    if (body === undefined) throw new ObjectInvalid(`${fat}.${field}`, `${fat}.${field} is required for type ${t}`);
    const bat = `${fat}.${field}`;
    switch (t) {
      case 'RequestHeaderModifier':
      case 'ResponseHeaderModifier':
        return { type: t, headers: headerChanges(body, bat) };
      case 'URLRewrite': {
        const b = object(body, bat);
        only(b, ['hostname', 'path'], `${bat}.`);
        const host = hostname(b['hostname'], `${bat}.hostname`);
        const path = pathModifier(b['path'], `${bat}.path`);
        if (!host && !path) throw new ObjectInvalid(bat, `${bat} rewrites nothing`);
        return { type: t, ...(host ? { hostname: host } : {}), ...(path ? { path } : {}) };
      }
      case 'RequestRedirect': {
        const b = object(body, bat);
        only(b, ['scheme', 'hostname', 'path', 'port', 'statusCode'], `${bat}.`);
        const scheme = b['scheme'];
        if (scheme !== undefined && scheme !== 'http' && scheme !== 'https') throw new ObjectInvalid(`${bat}.scheme`, `${bat}.scheme must be http or https`);
        const port = b['port'];
        if (port !== undefined && (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535)) throw new ObjectInvalid(`${bat}.port`, `${bat}.port must be a port number 1-65535`);
        const statusCode = b['statusCode'] ?? 302;
        if (typeof statusCode !== 'number' || !REDIRECT_CODES.includes(statusCode)) throw new ObjectInvalid(`${bat}.statusCode`, `${bat}.statusCode must be one of ${REDIRECT_CODES.join(', ')}`);
        const host = hostname(b['hostname'], `${bat}.hostname`);
        const path = pathModifier(b['path'], `${bat}.path`);
        return { type: t, statusCode, ...(scheme ? { scheme } : {}), ...(host ? { hostname: host } : {}), ...(path ? { path } : {}), ...(typeof port === 'number' ? { port } : {}) };
      }
      case 'RequestMirror': {
        const b = object(body, bat);
        only(b, ['backendRef', 'percent', 'fraction'], `${bat}.`);
        const ref = object(b['backendRef'], `${bat}.backendRef`);
        only(ref, ['group', 'kind', 'namespace', 'name', 'port'], `${bat}.backendRef.`);
        if ((ref['group'] ?? '') !== '' || (ref['kind'] ?? 'Service') !== 'Service') throw new ObjectInvalid(`${bat}.backendRef.kind`, `${bat}.backendRef must be a core Service`);
        const port = ref['port'];
        if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) throw new ObjectInvalid(`${bat}.backendRef.port`, `${bat}.backendRef.port is required for a Service (1-65535)`);
        if (b['percent'] !== undefined && b['fraction'] !== undefined) throw new ObjectInvalid(`${bat}.fraction`, `${bat}: percent and fraction do not go together`);
        let percent = 100;
        if (b['percent'] !== undefined) {
          const p = b['percent'];
          if (typeof p !== 'number' || !Number.isInteger(p) || p < 0 || p > 100) throw new ObjectInvalid(`${bat}.percent`, `${bat}.percent must be a whole number 0-100`);
          percent = p;
        } else if (b['fraction'] !== undefined) {
          const fr = object(b['fraction'], `${bat}.fraction`);
          only(fr, ['numerator', 'denominator'], `${bat}.fraction.`);
          const n = fr['numerator'];
          const d = fr['denominator'] ?? 100;
          if (typeof n !== 'number' || typeof d !== 'number' || !Number.isInteger(n) || !Number.isInteger(d) || d < 1 || n < 0 || n > d) throw new ObjectInvalid(`${bat}.fraction`, `${bat}.fraction must be numerator 0..denominator, denominator at least 1`);
          percent = (n / d) * 100;
        }
        return { type: t, backend: { namespace: refs.namespace(ref['namespace'], `${bat}.backendRef.namespace`), name: refs.name(ref['name'], `${bat}.backendRef.name`), port }, percent };
      }
    }
  });
  // Gateway API: one of each type per rule except RequestMirror; a redirect and a rewrite do not go together.
  const types = filters.map((f) => f.type);
  for (const [i, type] of types.entries()) {
    if (type !== 'RequestMirror' && types.indexOf(type) !== i) throw new ObjectInvalid(`${at}[${i}].type`, `${at}[${i}]: a second ${type} (one of each per ${where === 'rule' ? 'rule' : 'backend'})`);
  }
  if (types.includes('RequestRedirect') && types.includes('URLRewrite')) throw new ObjectInvalid(at, `${at}: RequestRedirect and URLRewrite cannot be on one rule`);
  return filters;
}
