/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map of nodemesh, declared once. The agent pins them by name under
 * /sys/fs/bpf/nodemesh/v<NM_MAP_ABI_VERSION>/ so that a restarted agent finds the same maps.
 */
#ifndef NODEMESH_MAPS_H
#define NODEMESH_MAPS_H

#include "nodemesh_abi.h"

#define NM_MAX_CAPTURED_IN_FLIGHT 65536
#define NM_MAX_POD_LISTENERS 4096

/*
 * Original destination by socket cookie, written by connect4/connect6 before the port of the
 * client socket is known. sockops moves the entry to nm_orig_dst once the connection is up.
 * LRU: a connect that never completes must not leak an entry forever.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NM_MAX_CAPTURED_IN_FLIGHT);
	__type(key, __u64);
	__type(value, struct nm_addr);
} nm_cookie_dst SEC(".maps");

/* Original destination by {pod netns cookie, client port, family}: what the proxy reads. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NM_MAX_CAPTURED_IN_FLIGHT);
	__type(key, struct nm_orig_key);
	__type(value, struct nm_addr);
} nm_orig_dst SEC(".maps");

/* In-pod listening sockets that sk_lookup steers inbound connections to. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, NM_MAX_POD_LISTENERS);
	__type(key, struct nm_listener_key);
	__type(value, __u64);
} nm_pod_listeners SEC(".maps");

/* Connections the proxy is delivering inside a pod right now (during their handshake only). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NM_MAX_CAPTURED_IN_FLIGHT);
	__type(key, struct nm_bypass_key);
	__type(value, __u8);
} nm_inbound_bypass SEC(".maps");

/*
 * Fail-closed enrollment: cgroup ids (the cgroup directory's inode) whose pods may open
 * connections that capture did not rewrite: verified pods and pods that opted out of the mesh.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_MAX_POD_LISTENERS);
	__type(key, __u64);
	__type(value, __u8);
} nm_allowed_cgroups SEC(".maps");

/*
 * Node-wide settings the agent writes and the programs read (one entry): they stay in force
 * while no agent runs. Bit NM_SETTING_STRICT_INBOUND: fail-closed enrollment is on, so sk_lookup
 * drops a connection to an enrolled pod that it cannot hand to a live listener (agent stopped,
 * an address of the pod it does not know) instead of letting it reach the application.
 */
#define NM_SETTING_STRICT_INBOUND 1

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} nm_settings SEC(".maps");

/* Events the programs count for the agent's metrics, by index (NM_COUNT_*). */
#define NM_COUNT_NON_TCP_STREAM 0
#define NM_COUNTERS 4

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NM_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} nm_counters SEC(".maps");

#endif /* NODEMESH_MAPS_H */
