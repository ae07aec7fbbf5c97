#!/bin/bash
echo "task ${TASK_ID} of job ${JOB_NAME}: exit $1"
exit $1
