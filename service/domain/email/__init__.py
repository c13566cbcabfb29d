"""E-mail: the transactional outbox (``outbox.enqueue_email``) and its delivery worker."""
