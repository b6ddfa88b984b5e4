// coredns: the cluster DNS of the local real node, from the pinned github.com/coredns/coredns
// module, with only the plugins it needs compiled in (CoreDNS's documented way to build a
// custom plugin set from an external main package). Built by hack/k8s/build.sh --node.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order plugins run in (a subset of CoreDNS's plugin.cfg, in its order).
var directives = []string{"bind", "errors", "log", "health", "ready", "cache", "kubernetes"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
