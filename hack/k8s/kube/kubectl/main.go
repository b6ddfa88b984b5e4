// Command kubectl is a minimal kubectl built from k8s.io/kubectl at the
// pinned release (same as k8s.io/kubernetes/cmd/kubectl, minus auth plugins).
package main

import (
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
