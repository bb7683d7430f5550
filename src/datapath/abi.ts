/**
 * The TypeScript view of bpf/include/nodemesh_abi.h. test/integration/abi.test.ts checks these
 * layouts against offsetof() in the addon and against the BTF of the compiled BPF objects.
 */
import { ipv6Bytes, ipv6Text, type Family, type SocketAddress } from '../shared/address.js';

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
/** The proxy's own in-pod ports: a connection or CONNECT to one of them would loop. */
export const NM_PROXY_PORTS: ReadonlySet<number> = new Set([NM_PORT_OUTBOUND, NM_PORT_INBOUND, NM_PORT_INBOUND_TUNNEL, NM_PORT_DNS]);
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
