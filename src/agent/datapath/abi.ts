/**
 * The TypeScript view of bpf/include/nodemesh_abi.h. test/integration/abi.test.ts checks these
 * layouts against offsetof() in the addon and against the BTF of the compiled BPF objects.
 */
import { isIPv4, isIPv6 } from 'node:net';

export const AF_INET = 2;
export const AF_INET6 = 10;

export const NM_MAP_ABI_VERSION = 1;
export const NM_PROXY_MARK = 0x539;
export const NM_DELIVERY_MARK = 0x53a;
export const NM_DELIVERY_TABLE = 15006;
export const NM_PORT_OUTBOUND = 15001;
export const NM_PORT_INBOUND = 15006;
export const NM_PORT_INBOUND_TUNNEL = 15008;
export const NM_PORT_DNS = 15053;
export const NM_ROLE_INBOUND = 1;
export const NM_ROLE_INBOUND_TUNNEL = 2;

export const ABI_CONSTANTS: Readonly<Record<string, number>> = {
  NM_MAP_ABI_VERSION,
  NM_PROXY_MARK,
  NM_DELIVERY_MARK,
  NM_DELIVERY_TABLE,
  NM_PORT_OUTBOUND,
  NM_PORT_INBOUND,
  NM_PORT_INBOUND_TUNNEL,
  NM_PORT_DNS,
  NM_ROLE_INBOUND,
  NM_ROLE_INBOUND_TUNNEL,
};

export const LAYOUTS = {
  nm_addr: { size: 24, offsets: { family: 0, port: 4, pad: 6, addr: 8 } },
  nm_orig_key: { size: 16, offsets: { netns_cookie: 0, port: 8, family: 10, pad: 12 } },
  nm_listener_key: { size: 24, offsets: { family: 0, role: 4, addr: 8 } },
  nm_bypass_key: { size: 40, offsets: { family: 0, remote_port: 4, local_port: 6, remote_addr: 8, local_addr: 24 } },
} as const;

export type Family = 4 | 6;

/** A socket address as the application dialed it. */
export interface SocketAddress {
  readonly family: Family;
  readonly address: string;
  readonly port: number;
}

function writeAddress(buf: Buffer, offset: number, family: Family, address: string): void {
  if (family === 4) {
    const parts = address.split('.').map(Number);
    for (let i = 0; i < 4; i++) buf[offset + i] = parts[i] ?? 0;
    return;
  }
  const bytes = ipv6Bytes(address);
  bytes.copy(buf, offset);
}

function readAddress(buf: Buffer, offset: number, family: Family): string {
  if (family === 4) return `${buf[offset]}.${buf[offset + 1]}.${buf[offset + 2]}.${buf[offset + 3]}`;
  return ipv6Text(buf, offset);
}

/** The RFC 5952 text of 16 address bytes at offset. */
export function ipv6Text(buf: Buffer, offset = 0): string {
  const groups: string[] = [];
  for (let i = 0; i < 8; i++) groups.push(buf.readUInt16BE(offset + i * 2).toString(16));
  return compressIPv6(groups);
}

/** RFC 5952 text form: the longest run of two or more zero groups becomes "::". */
function compressIPv6(groups: string[]): string {
  let bestStart = -1;
  let bestLen = 0;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === '0') j++;
    if (j - i > bestLen && j - i >= 2) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  if (bestStart < 0) return groups.join(':');
  return `${groups.slice(0, bestStart).join(':')}::${groups.slice(bestStart + bestLen).join(':')}`;
}

export function ipv6Bytes(address: string): Buffer {
  if (!isIPv6(address)) throw new RangeError(`not an IPv6 address: ${address}`);
  const out = Buffer.alloc(16);
  let text = address;
  // An embedded dotted quad (::ffff:1.2.3.4) becomes two hex groups.
  const quad = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (quad?.[1]) {
    const p = quad[1].split('.').map(Number);
    text = `${text.slice(0, quad.index)}${(((p[0] ?? 0) << 8) | (p[1] ?? 0)).toString(16)}:${(((p[2] ?? 0) << 8) | (p[3] ?? 0)).toString(16)}`;
  }
  const [head = '', tail] = text.split('::');
  const h = head === '' ? [] : head.split(':');
  const t = tail === undefined || tail === '' ? [] : tail.split(':');
  const groups = tail === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t];
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), i * 2));
  return out;
}

/** host:port, with brackets around an IPv6 host. */
export function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

export function familyOf(address: string): Family {
  if (isIPv4(address)) return 4;
  if (isIPv6(address)) return 6;
  throw new RangeError(`not an IP address: ${address}`);
}

const toAf = (f: Family): number => (f === 4 ? AF_INET : AF_INET6);

function fromAf(af: number): Family {
  if (af === AF_INET) return 4;
  if (af === AF_INET6) return 6;
  throw new RangeError(`unknown address family ${af} in a BPF map entry`);
}

/** struct nm_addr */
export function encodeAddr(a: SocketAddress): Buffer {
  const L = LAYOUTS.nm_addr;
  const buf = Buffer.alloc(L.size);
  buf.writeUInt32LE(toAf(a.family), L.offsets.family);
  buf.writeUInt16BE(a.port, L.offsets.port);
  writeAddress(buf, L.offsets.addr, a.family, a.address);
  return buf;
}

export function decodeAddr(buf: Buffer): SocketAddress {
  const L = LAYOUTS.nm_addr;
  const family = fromAf(buf.readUInt32LE(L.offsets.family));
  return { family, port: buf.readUInt16BE(L.offsets.port), address: readAddress(buf, L.offsets.addr, family) };
}

/** struct nm_orig_key: a captured connection as the outbound listener sees it. */
export interface OrigKey {
  readonly netnsCookie: bigint;
  /** The client's local port, i.e. the accepted socket's remote port. */
  readonly port: number;
  readonly family: Family;
}

export function encodeOrigKey(k: OrigKey): Buffer {
  const L = LAYOUTS.nm_orig_key;
  const buf = Buffer.alloc(L.size);
  buf.writeBigUInt64LE(k.netnsCookie, L.offsets.netns_cookie);
  buf.writeUInt16LE(k.port, L.offsets.port);
  buf.writeUInt16LE(toAf(k.family), L.offsets.family);
  return buf;
}

export function decodeOrigKey(buf: Buffer): OrigKey {
  const L = LAYOUTS.nm_orig_key;
  return {
    netnsCookie: buf.readBigUInt64LE(L.offsets.netns_cookie),
    port: buf.readUInt16LE(L.offsets.port),
    family: fromAf(buf.readUInt16LE(L.offsets.family)),
  };
}

/** struct nm_listener_key */
export interface ListenerKey {
  readonly family: Family;
  readonly role: number;
  readonly address: string;
}

export function encodeListenerKey(k: ListenerKey): Buffer {
  const L = LAYOUTS.nm_listener_key;
  const buf = Buffer.alloc(L.size);
  buf.writeUInt32LE(toAf(k.family), L.offsets.family);
  buf.writeUInt32LE(k.role, L.offsets.role);
  writeAddress(buf, L.offsets.addr, k.family, k.address);
  return buf;
}
