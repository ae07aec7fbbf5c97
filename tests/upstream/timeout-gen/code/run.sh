#!/bin/bash
echo "started, sleeping $1 s"
sleep $1
echo "finished"
