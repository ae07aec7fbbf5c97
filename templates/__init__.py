"""Worker job templates (Jinja2), installed as the package scalebox_hpc.templates so that
the job script code finds them wherever the package is installed; site administrators
copy one and point a site config's template key at the copy."""
