"""The dashboard page: one self-contained HTML file (inline CSS and JavaScript, no fetches from
anywhere else) shared by the daemon's live page and the reports of ``sim`` and ``cluster``."""
