// SPDX-License-Identifier: Apache-2.0
#include "netns_sockets.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <mutex>

#include "common.h"

namespace nodemesh {

namespace {

// An open fd of a pod's netns; closed when the last user (registry or a socket call) drops it.
struct NetnsFd {
  NetnsFd(int f, ino_t i) : fd(f), inode(i) {}
  NetnsFd(const NetnsFd&) = delete;
  NetnsFd& operator=(const NetnsFd&) = delete;
  ~NetnsFd() { close(fd); }
  const int fd;
  const ino_t inode;
};

std::mutex registryMu;
std::map<std::string, std::shared_ptr<NetnsFd>> registry;

// The netns now at `path`. A path can be reused by a new pod (same name, new netns): the inode
// tells them apart, and the old namespace's fd is dropped.
std::shared_ptr<NetnsFd> NetnsAt(const std::string& path) {
  struct stat st = {};
  if (stat(path.c_str(), &st) != 0) ThrowSys(errno, "stat", path);
  {
    std::lock_guard<std::mutex> lock(registryMu);
    auto it = registry.find(path);
    if (it != registry.end() && it->second->inode == st.st_ino) return it->second;
  }
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) ThrowSys(errno, "open", path);
  struct stat opened = {};
  if (fstat(fd, &opened) != 0) {
    int err = errno;
    close(fd);
    ThrowSys(err, "fstat", path);
  }
  auto ns = std::make_shared<NetnsFd>(fd, opened.st_ino);
  std::lock_guard<std::mutex> lock(registryMu);
  registry[path] = ns;
  return ns;
}

// This thread's own netns, opened once per thread (libuv pool threads live as long as the process).
int OwnNetns() {
  thread_local int own = -1;
  if (own < 0) {
    own = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (own < 0) ThrowSys(errno, "open", "/proc/thread-self/ns/net");
  }
  return own;
}

}  // namespace

int NetnsSocket(const std::string& nsPath, int family) {
  int own = OwnNetns();
  std::shared_ptr<NetnsFd> ns = NetnsAt(nsPath);
  // Already there (a process inside a pod asks for a socket of its own netns): no setns(), which
  // would need CAP_SYS_ADMIN that a pod's process does not have.
  thread_local ino_t ownInode = 0;
  if (ownInode == 0) {
    struct stat st = {};
    if (fstat(own, &st) == 0) ownInode = st.st_ino;
  }
  if (ns->inode == ownInode) {
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) ThrowSys(errno, "socket", nsPath);
    return fd;
  }
  if (setns(ns->fd, CLONE_NEWNET) != 0) {
    int err = errno;
    // A netns that could not be entered is not remembered: the path may be valid next time.
    ReleaseNetns(nsPath);
    ThrowSys(err, "setns", nsPath);
  }
  int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int err = errno;
  if (setns(own, CLONE_NEWNET) != 0) {
    // Never go on inside a pod's netns: every later socket of this thread would be made there.
    fprintf(stderr, "nodemesh: cannot return to the agent's netns after making a socket in %s: %s\n", nsPath.c_str(), strerror(errno));
    abort();
  }
  if (fd < 0) ThrowSys(err, "socket", nsPath);
  return fd;
}

bool ReleaseNetns(const std::string& nsPath) {
  std::lock_guard<std::mutex> lock(registryMu);
  return registry.erase(nsPath) > 0;
}

}  // namespace nodemesh
