// SPDX-License-Identifier: Apache-2.0
// Sockets made inside a pod's network namespace.
//
// Only socket() depends on the calling thread's network namespace: bind, connect and listen use
// the namespace the socket was made in. The calling thread (a libuv pool thread) enters the
// pod's netns with setns(), makes the socket and returns to its own netns at once. The agent
// holds one open fd per pod netns (no thread): that is 3 us per socket on this machine's kernel,
// less than handing the request to a per-pod thread, and ~50 KiB less memory per pod
// (bench/memory.ts). A thread that cannot return to its own netns aborts the process: it must
// never run anything else inside a pod.
// Release(path) closes the pod's fd: an open fd keeps a netns alive.
#pragma once

#include <string>

namespace nodemesh {

// A new TCP socket (non-blocking, close-on-exec) in the netns at nsPath. Throws SysError.
int NetnsSocket(const std::string& nsPath, int family);

// Forgets (closes) the netns fd kept for that path, if there is one. Returns whether there was.
bool ReleaseNetns(const std::string& nsPath);

}  // namespace nodemesh
