"""The name tritonclient's generated gRPC messages carry (``__module__ == "grpc_service_pb2"``).

Ray Serve pickles each gRPC request between its proxy and the fmplex ingress;
pickle finds a class by its module and name, so this module must import in
every Ray worker. It re-exports tritonclient 2.51's classes, nothing else.
"""

from tritonclient.grpc.service_pb2 import *  # noqa: F401,F403
