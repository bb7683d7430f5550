/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one ABI shared by the BPF programs (bpf/NAME.bpf.c), the C++ addon (native/) and the
 * TypeScript view (src/datapath/abi.ts). A test compares all three: sizes and offsets
 * from offsetof() in the addon, from the BTF of the compiled objects, and from the TS codec.
 *
 * Changing a layout here changes the pinned map ABI: bump NM_MAP_ABI_VERSION, which is the
 * "v1" of /sys/fs/bpf/nodemesh/v1/.
 */
#ifndef NODEMESH_ABI_H
#define NODEMESH_ABI_H

#include <linux/types.h>

#define NM_MAP_ABI_VERSION 1

/* Address families as the kernel numbers them (AF_INET, AF_INET6); BPF C has no libc. */
#define NM_AF_INET 2
#define NM_AF_INET6 10

/* Sockets opened by the node proxy carry this SO_MARK; every program lets them pass. */
#define NM_PROXY_MARK 0x539

/*
 * Mark of the sockets that deliver inbound connections to the application inside a pod. With
 * net.ipv4.tcp_fwmark_accept=1 in the pod, the application's side of the connection inherits it,
 * and the pod's policy route (fwmark NM_DELIVERY_MARK -> table NM_DELIVERY_TABLE: local default)
 * brings its replies back to the proxy's transparent socket.
 */
#define NM_DELIVERY_MARK 0x53a
#define NM_DELIVERY_TABLE 15006

/* In-pod listener ports (design.md section 2). */
#define NM_PORT_OUTBOUND 15001
#define NM_PORT_INBOUND 15006
#define NM_PORT_INBOUND_TUNNEL 15008
#define NM_PORT_DNS 15053

/* Roles of in-pod listening sockets in the inbound steering SOCKHASH. */
#define NM_ROLE_INBOUND 1
#define NM_ROLE_INBOUND_TUNNEL 2

/*
 * An IPv4 or IPv6 socket address. addr and port are in network byte order, exactly as the
 * application passed them to connect(); an IPv4 address lives in addr[0].
 */
struct nm_addr {
	__u32 family; /* NM_AF_INET or NM_AF_INET6 */
	__u16 port;   /* network byte order */
	__u16 pad;
	__u32 addr[4]; /* network byte order */
};

/*
 * Key of the original-destination table: the captured client socket seen from the proxy's
 * listener. netns_cookie is SO_NETNS_COOKIE of the pod's network namespace, port is the
 * client's local port (the peer port of the accepted socket) in host byte order, family is the
 * family the listener sees (a v4-mapped IPv6 client counts as NM_AF_INET).
 */
struct nm_orig_key {
	__u64 netns_cookie;
	__u16 port;   /* host byte order */
	__u16 family; /* NM_AF_INET or NM_AF_INET6 */
	__u32 pad;
};

/* Key of the inbound steering SOCKHASH: which in-pod listener serves a pod address. */
struct nm_listener_key {
	__u32 family; /* NM_AF_INET or NM_AF_INET6 */
	__u32 role;   /* NM_ROLE_* */
	__u32 addr[4]; /* pod address, network byte order */
};

/*
 * An inbound connection the proxy itself is delivering to the application, by 4-tuple as the
 * pod sees it: sk_lookup lets exactly these through instead of steering them to 15006 again.
 * Ports in host byte order; addresses in network byte order.
 */
struct nm_bypass_key {
	__u32 family;
	__u16 remote_port;
	__u16 local_port;
	__u32 remote_addr[4];
	__u32 local_addr[4];
};

#endif /* NODEMESH_ABI_H */
