#!/bin/sh
# C++ compiler wrapper for building mmcv 2.1.0 against torch >= 2.14: mmcv's setup.py forces
# -std=c++17, torch's headers need C++20. Rewrites that one flag and runs the real compiler
# ($MTL_REAL_CXX, default g++) with every other argument unchanged.
for a in "$@"; do
  [ "$a" = "-std=c++17" ] && a="-std=c++20"
  set -- "$@" "$a"
  shift
done
exec "${MTL_REAL_CXX:-g++}" "$@"
