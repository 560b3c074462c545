// Sends one TLS ClientHello from Go's crypto/tls to the address given.
package main

import (
	"crypto/tls"
	"os"
)

func main() {
	conn, err := tls.Dial("tcp", os.Args[1], &tls.Config{ServerName: os.Args[2]})
	if err == nil {
		conn.Close()
	}
}
