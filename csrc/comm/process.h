// Is a process of this host alive? Shared by the transports whose peers are processes of one host
// (shared memory, CUDA IPC): a wait that sees its peer gone raises instead of waiting out the timeout.
#pragma once

#include <fstream>
#include <string>

namespace pyparallel {

// Alive unless /proc says it is gone or a zombie (a killed child not yet reaped still has an entry).
// pid <= 0 (not known yet) counts as alive: only the timeout can tell.
inline bool process_alive(int pid) {
  if (pid <= 0) return true;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return false;
  std::string line;
  std::getline(stat, line);
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos || paren + 2 >= line.size()) return true;
  const char state = line[paren + 2];
  return state != 'Z' && state != 'X';
}

}  // namespace pyparallel
