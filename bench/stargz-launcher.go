// A minimal launcher for stargz-snapshotter's snapshotter service (benchmarks only): serves
// containerd's Snapshots API on a unix socket. Built by bench/stargz.sh against Debian's
// stargz-snapshotter sources; our code, not upstream's daemon.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "/var/lib/stargz-bench", "state directory")
	address := flag.String("address", "/run/stargz-bench.sock", "gRPC socket")
	insecure := flag.String("insecure", "", "registry host reached over plain HTTP")
	flag.Parse()
	ctx := context.Background()
	var cfg service.Config
	if *insecure != "" {
		cfg.ResolverConfig.Host = map[string]resolver.HostConfig{
			*insecure: {Mirrors: []resolver.MirrorConfig{{Host: *insecure, Insecure: true}}},
		}
	}
	sn, err := service.NewStargzSnapshotterService(ctx, *root, &cfg)
	if err != nil {
		log.Fatalf("stargz service: %v", err)
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	go func() {
		if err := rpc.Serve(l); err != nil {
			log.Fatalf("serve: %v", err)
		}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	rpc.Stop()
	_ = sn.Close()
}
