"""The wire: every NATS subject and message schema of Duet, and their msgpack codec.

The only place that defines what travels between services. Tensors never travel here: KV and
weights stay in the unit's shared memory and move as block ids and handles.
"""
