// SPDX-License-Identifier: Apache-2.0
// Sockets made inside a pod's network namespace without a thread and two setns() per socket.
//
// Only socket() depends on the calling thread's network namespace: bind, connect and listen use
// the namespace the socket was made in. So each pod gets one long-lived thread that entered its
// netns once and makes sockets on request; everything else runs on the caller's thread.
// Release(path) ends a pod's thread: a thread inside a netns keeps that netns alive.
#pragma once

#include <string>

namespace nodemesh {

// A new TCP socket (non-blocking, close-on-exec) in the netns at nsPath. Throws SysError.
int NetnsSocket(const std::string& nsPath, int family);

// Ends the thread of that netns, if there is one. Returns whether there was.
bool ReleaseNetns(const std::string& nsPath);

}  // namespace nodemesh
