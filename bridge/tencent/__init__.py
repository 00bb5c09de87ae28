"""The Tencent Cloud Chat domain, pure and without I/O: one callback from the posted bytes to its record but
for the partition (`callback`), the webhook protocol (query, body, answers), the registry of callback
commands and their owning entity, the signature, the partition rule, the record envelope and its check, and
Tencent's sample callbacks."""
