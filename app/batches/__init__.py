"""The Message Batches API: batches of message requests run on the backends' idle capacity."""
