#!/bin/bash
# One line per message: the body between brackets and its headers.
printf '[%s] %s\n' "$1" "$2"
