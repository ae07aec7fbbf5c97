-- What every connection does (scalebox_hpc/db/connection.py).

-- name: listen
-- {channel} is spliced in as a quoted identifier: module channels (sbx_m<id>) and the
-- random probe channels of 'site check'.
LISTEN {channel};
