# shellcheck shell=bash
# Sourced by the launchers for --dry-run: print commands so that they can be pasted into a shell.

q() { # one word for a POSIX shell: as it is when safe, else in single quotes (after `--flag=`)
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

words() { # the arguments as one shell-quoted line
  local line="" a
  for a in "$@"; do line+="${line:+ }$(q "$a")"; done
  printf '%s' "$line"
}
