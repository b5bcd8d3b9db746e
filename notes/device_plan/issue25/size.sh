#!/usr/bin/env bash
# Scratch (here, before the device calls): bytes one device call sends = tracked + untracked-not-ignored files of
# the working tree + the carried paths given as arguments; must stay below 64 MiB (67108864).
#   bash notes/device_plan/issue25/size.sh .whl .carry/pg .carry/news .carry/gguf/p00
cd "$(dirname "$0")/../../.."
tree=$( { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | awk '$2=="total"{s+=$1} END{print s+0}')
carry=0; [ $# -gt 0 ] && carry=$(du -cb "$@" | tail -1 | cut -f1)
total=$((tree + carry)); limit=67108864
echo "tree $tree + carry $carry = $total bytes of $limit ($(( (limit - total) / 1000 )) kB left)"
[ $total -lt $limit ]
