"""Credentials never leave in a message: `redact` is applied to every URL and error text before it is logged, shown,
or written to config.json, W&B or a checkpoint."""
from __future__ import annotations

import os
import re

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """Hide credentials in a URL or any text holding URLs (log lines, error messages, configs):
    userinfo (`https://user:pass@host`), every query-string value (presigned URLs carry signatures there), and
    the literal values of the AWS credential variables should they appear."""
    text = re.sub(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]+@", r"\1***@", str(text))
    text = re.sub(r"([?&][^=&\s#]+=)[^&\s#'\"]*", r"\1***", text)
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text
