"""The Tencent Cloud Chat domain, pure and without I/O: the webhook protocol (query, body, answers), the
registry of callback commands and their owning entity, the signature, the partition rule, the record
envelope and its check, and Tencent's sample callbacks."""
